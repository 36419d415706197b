"""TinT, Transformer in Transformer (Panigrahi, Malladi, Xia, Arora, 2023): a transformer whose one
forward pass runs an inner model's forward, an approximate backward, one SGD step on its top
layers and the forward of the test part through them (``ftlab tint``), for Llama-style models.

* :mod:`ftlab.tint.inner` -- the inner Llama-style model as plain tensors (read from Hugging Face);
* :mod:`ftlab.tint.reference` -- the step TinT performs, in plain PyTorch, with its approximations;
* :mod:`ftlab.tint.construct` -- the TinT module built from the inner model's weights;
* :mod:`ftlab.tint.costs` -- ``ftlab tint build``: the equality check, size and cost;
* :mod:`ftlab.tint.experiment` -- ``ftlab tint eval``: few-shot evaluations of every method;
* :mod:`ftlab.tint.figure` -- the README picture.

Nothing is imported here: ``import ftlab.tint.<module>`` loads what it needs.
"""
