"""The built-in `digits` model: a small class-conditional DiT on scikit-learn's 8x8 handwritten digits,
trained by the project's own recipe (`harmonica digits train`), with a digit classifier for quality metrics."""
