"""The models: CLIP towers (`clip`), the OT layers (`ot_layers`), and one module per method.

A method module (`otseg`, ...) offers the same few things, with no base class:
  get_config(arg)                         its model config (config.model), with
    .name                                 the method: 'otseg' -> otseg_jax.models.otseg, or a
                                          dotted module path ('tests.linear_probe_method')
    .trainable                            regex over parameter paths: the trained parameters
    .text                                 the class text it asks for: 'embeddings' (a fixed
                                          (K, N, C) array) or 'tokens' (tokenized class names,
                                          for a prompt learner inside the model)
    .clip_towers, .dont_load              {subtree: CLIP tower} the parameters start from
  model_from_config(config)               the linen model, whose
    encode_text(text_input, *, train)     gives the class text the forward reads, and
    __call__(images, text, *, train)      returns (maps, aux): the logit maps the loss and the
                                          evaluation read, and the intermediates; aux's
                                          'sinkhorn_iterations_by_path' ({path: count}), if
                                          any, is logged by the trainer
  eval_probabilities(maps, seen, config)  (B, H, W, K) probabilities for the argmax
  pseudo_labels(maps, labels, seen, config)  transductive self-training targets
The loss is named in the config (`config.loss.name`, a function of `otseg_jax.losses`).

Optional hooks, looked up by name where a tool needs them (a method without one gets a clear
error from that tool, nothing else changes):
  from_mmseg_state_dict(state_dict, config)  (params, sorted unused tensor names) from the
                                          authors' mmseg checkpoint (`python -m otseg_jax.convert
                                          --from mmseg`); the converter checks the tree against
                                          the model's own
  config_from_reference(ref)              the model config of a reference dump's `config/json`
                                          (`convert --config dump.json`, `otseg_jax.parity`)
  mmseg_decoder_layer_rows(layer, with_output)  parity: (torch name, path, transform) rows of
                                          one decoder layer, for tensors the model never creates
  init_after_load(params, text_input, config)  the starting parameters (numpy) given the
                                          initialised ones with the CLIP towers merged, the
                                          training text input and the model config, for
                                          parameters that start from the towers' outputs (LDVC:
                                          its deep text prompts from the template's hidden
                                          states); `trainer.init_params` calls it, except when
                                          the parameters come from `init_from`
OTSeg's live in `otseg_mmseg`, exposed by `otseg`.
"""

import importlib
import types
from typing import Any

import jax


def get_method(name: str) -> types.ModuleType:
  """The method module of `config.model.name`, as big_vision's train.py picks its model."""
  return importlib.import_module(name if '.' in name else f'otseg_jax.models.{name}')


def init(model: Any, rngs: Any, images: jax.Array, text_input: Any) -> Any:
  """`model.init` through `encode_text` and `__call__`, so that both create their parameters."""

  def text_then_images(module, images, text_input):
    return module(images, module.encode_text(text_input, train=False), train=False)

  return model.init(rngs, images, text_input, method=text_then_images)


def encode_text(model: Any, params: Any, text_input: Any) -> jax.Array:
  """The class text of eval and predict, computed once for all classes and reused by every
  window: `model.encode_text` in eval mode."""
  return jax.jit(lambda p, t: model.apply({'params': p}, t, train=False,
                                          method='encode_text'))(params, text_input)
