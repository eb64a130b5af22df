"""Where models registered before the class moved to ulcore.models.pyfunc find it: MLflow unpickles them as
`ulcore.bundle.SafetensorsBundle` (see ulcore.models.pyfunc.PICKLED_PATHS)."""

from ulcore.models.pyfunc import SafetensorsBundle

__all__ = ["SafetensorsBundle"]
