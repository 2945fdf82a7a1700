"""The bundled demo model's own code: its dataset, its scorer, its tokenizer and its recipe.

``models/tiny-shapes`` is a complete Stable Diffusion at toy size, trained from scratch on
pictures of coloured shapes. What is particular to it lives here, apart from the
``stable_diffusion`` package, which knows nothing of it:

* ``dataset``: the captioned shapes, drawn on the fly (``ShapesDataset``), with held-out combinations;
* ``scoring``: a deterministic judge of whether an image shows what its caption says;
* ``tokenizer``: the BPE vocabulary learned from the captions;
* ``recipe``: the architecture (``tiny_shapes_pipeline``) and the training settings;
* ``python -m tiny_shapes init | vae | diffusion``: builds the model and trains it with
  ``stable_diffusion.train``.
"""
