"""`ldm demo`: the embedded end-to-end job (synthetic data, both stages, exports, samples, adherence) and
its report."""
