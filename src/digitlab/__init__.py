"""digitlab: the MNIST convolutional-network lab as a package.

The lab's steps, as calls::

    from digitlab import load_mnist, build_model, summary, prepare, TrainConfig, train, evaluate, predict
    from digitlab.plots import plot_heatmap, plot_imgs

    (x_train, y_train), (x_test, y_test) = load_mnist()   # (60000, 28, 28) uint8, as keras.datasets.mnist
    plot_heatmap(x_train[5], label=y_train[5])            # look at one digit
    plot_imgs(x_train[:8], y_train[:8])                    # the lab's plot_imgs
    x = prepare(x_train)                                   # scaled to [0, 1], shaped N×28×28×1

    model = build_model(seed=0)                            # 4 × (Conv 3×3 + BatchNorm + ReLU), GAP, Dense(10)
    print(summary(model))                                  # Keras-style table: 99,402 parameters
    history = train(model, x_train, y_train, TrainConfig.from_recipe("lab", seed=0))
    print(history.history["loss"])                         # Keras' dict of lists, one value per epoch
    result = evaluate(model, x_test, y_test)               # .loss, .accuracy, .confusion, .per_class()
    digits = predict(model, x_test[:25]).labels           # logits, probabilities, labels
    plot_imgs(x_test[:25], digits)

Names are imported on first use, so `import digitlab` stays quick. Three of them share
their name with the submodule that defines them (``train``, ``evaluate``, ``predict``):
``digitlab.train`` is always the function; import the module's other names with
``from digitlab.train import ...``.
"""

import sys
from importlib import import_module
from types import ModuleType

__version__ = "0.1.0"

_API = {
    "load_mnist": "digitlab.data",
    "class_names": "digitlab.data",
    "build_model": "digitlab.model",
    "summary": "digitlab.model",
    "prepare": "digitlab.model",
    "TrainConfig": "digitlab.train",
    "train": "digitlab.train",
    "evaluate": "digitlab.evaluate",
    "predict": "digitlab.predict",
    "predict_images": "digitlab.predict",
    "load_recognizer": "digitlab.predict",
    "save_model": "digitlab.serialization",
    "load_model": "digitlab.serialization",
    "run_training": "digitlab.runs",
    "plot_heatmap": "digitlab.plots",
    "plot_imgs": "digitlab.plots",
    "plot_predictions": "digitlab.plots",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> object:
    """Import a public name on first use."""
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'digitlab' has no attribute {name!r}")


class _Package(ModuleType):
    """The package module, keeping each public name bound to its function or class.

    Importing a submodule sets it as an attribute of the package; where the submodule
    has the name of a public function (``digitlab.train``), that would hide the function.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name in _API and isinstance(value, ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
