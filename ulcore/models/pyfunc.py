"""The registered-model class: safetensors weight files plus the resolved config, as an MLflow pyfunc model.

Its own module because subclassing `mlflow.pyfunc.PythonModel` imports most of MLflow (~3 s): processes that only
log metrics (Ray workers, the evaluate stage) or none at all never import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.pyfunc import PythonModel


class SafetensorsBundle(PythonModel):
    """A registered model = safetensors weight files + the resolved config, loadable without pickle.

    `mlflow.pyfunc.load_model("models:/ul-encoder@champion").unwrap_python_model()` gives `.state_dicts`
    (file key -> {tensor name: tensor}) and `.config_yaml`; `predict(["encoder"])` returns the named
    weights as numpy arrays. Building the network from them is ulcore.models' job.
    """

    def load_context(self, context: Any) -> None:
        from safetensors.torch import load_file

        self.state_dicts = {}
        self.config_yaml = ""
        for key, path in context.artifacts.items():
            if key == "config":
                self.config_yaml = Path(path).read_text()
            else:
                self.state_dicts[key] = load_file(path)

    def predict(self, context, model_input: list[str], params=None):  # only model_input is typed: MLflow validates it
        keys = list(model_input) if model_input else list(self.state_dicts)
        return {k: {n: t.float().numpy() for n, t in self.state_dicts[k].items()} for k in keys}


# Module paths under which MLflow pickled this class in models registered by earlier versions; MLflow unpickles a
# registered model with plain pickle, which imports the module named in the file. ulcore.bundle and
# ulcore.tracking.__getattr__ answer for them (tests/test_tracking.py loads a model pickled under each).
PICKLED_PATHS = ("ulcore.tracking", "ulcore.bundle")

__all__ = ["SafetensorsBundle", "PICKLED_PATHS"]
