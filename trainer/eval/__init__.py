"""Evaluation of generated images without networks: :mod:`trainer.eval.shapes` reads the color, shape,
position and size of the figure in a shapes image and scores them against the prompt."""
