"""The composition root of the embedded default (`python -m launch`): the API and the inference tier in one
process, the training worker as a child. The only module that imports both `api` and `inference`'s backend."""
