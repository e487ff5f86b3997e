"""digitlab: the MNIST convolutional-network lab as a package.

The lab's steps, as calls::

    from digitlab import load_mnist, build_model, summary, TrainConfig, train, evaluate, predict

    (x_train, y_train), (x_test, y_test) = load_mnist()
    model = build_model(seed=0)
    print(summary(model))
    history = train(model, x_train, y_train, TrainConfig.from_recipe("lab", seed=0))
    print(evaluate(model, x_test, y_test).accuracy)
    digits = predict(model, x_test[:25]).labels

Names are imported on first use, so `import digitlab` stays quick.
"""

from importlib import import_module

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
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'digitlab' has no attribute {name!r}")
