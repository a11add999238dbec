"""The pyfunc model's code, logged as an MLflow "model from code".

MLflow runs this file when it loads a version, so nothing of the model is unpickled: the
weights come from safetensors and the code from the `lmforge` package logged beside it.
"""

import mlflow.models

from lmforge.tracking.pyfunc_model import TextGenerator

mlflow.models.set_model(TextGenerator())
