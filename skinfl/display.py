"""Plots of influence results in scikit-learn's display style.

Each display is built ``from_estimator`` (it computes what it shows with a
fitted influence estimator) or ``from_predictions`` (from values computed
before), keeps those values as attributes, and draws them with
``plot(ax=...)``. matplotlib is an optional dependency: ``pip install
"skinfl[plot]"``.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from .metrics._ground_truth import training_losses
from .metrics._scores import flipped_mask

__all__ = ["InfluenceDisplay", "MislabelDisplay"]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - matplotlib is a test dependency
        raise ImportError(
            'Plotting needs matplotlib, which could not be imported. Install it with pip install "skinfl[plot]".'
        ) from error
    return plt


def _numpy(values):
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    if hasattr(values, "to_numpy"):  # pandas
        return values.to_numpy()
    return np.asarray(values)


def _rows(data):
    """``data`` indexable by row: pandas objects as numpy arrays (``[i]`` would select a column)."""
    return data.to_numpy() if hasattr(data, "iloc") else data


def _label(y, index):
    if y is None:
        return ""
    value = _numpy(_rows(y)[index]).ravel()
    text = ", ".join(f"{v:.3g}" if np.issubdtype(value.dtype, np.floating) else str(v) for v in value[:3])
    return f"y={text}"


_NORMALIZED = {"relatif": "RelatIF ", "cosine": "cosine "}


class InfluenceDisplay:
    """The most helpful and the most harmful training points of a few test points.

    Positive influence is helpful (see the sign convention in the user
    guide). With image inputs (``shape`` given) each row shows a test point
    and its training points as images, titled with their labels and
    influences; otherwise each test point gets a ranked bar chart.

    Build it with :meth:`from_estimator` or :meth:`from_predictions`.

    Parameters
    ----------
    helpful_indices : ndarray of shape (n_test, k)
        Training indices of the ``k`` most helpful points, most helpful first.
    helpful_values : ndarray of shape (n_test, k)
        Their influences.
    harmful_indices : ndarray of shape (n_test, k)
        Training indices of the ``k`` most harmful points, most harmful first.
    harmful_values : ndarray of shape (n_test, k)
        Their influences (negative for harmful points).
    X_train, y_train : array-like, default=None
        Training inputs and labels, to show images and labels.
    X_test, y_test : array-like, default=None
        The test points, to show them beside their training points.
    normalize : {None, "relatif", "cosine"}, default=None
        How the influences were normalized (see ``influences``): named on
        the axes.

    Attributes
    ----------
    figure_ : matplotlib.figure.Figure
        The figure drawn by :meth:`plot`.
    axes_ : ndarray of matplotlib.axes.Axes
        Its axes: one per test point for bar charts, a grid for images.

    See Also
    --------
    MislabelDisplay : Mislabelled points found by self-influence.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from skinfl.display import InfluenceDisplay
    >>> scores = np.array([[0.5, -0.2, 0.1, -0.7]])
    >>> display = InfluenceDisplay.from_predictions(scores, k=2, y_train=np.array([0, 1, 0, 1]))
    >>> display.helpful_indices.tolist(), display.harmful_indices.tolist()
    ([[0, 2]], [[3, 1]])
    """

    def __init__(self, helpful_indices, helpful_values, harmful_indices, harmful_values, *, X_train=None,
                 y_train=None, X_test=None, y_test=None, normalize=None):
        self.normalize = normalize
        self.helpful_indices = helpful_indices
        self.helpful_values = helpful_values
        self.harmful_indices = harmful_indices
        self.harmful_values = harmful_values
        self.X_train = X_train
        self.y_train = y_train
        self.X_test = X_test
        self.y_test = y_test

    @classmethod
    def from_estimator(cls, estimator, X_test, y_test, *, X=None, y=None, k=5, normalize=None, shape=None, ax=None):
        """Compute the top influences with a fitted estimator and plot them.

        Parameters
        ----------
        estimator : BaseInfluence
            A fitted influence estimator.
        X_test, y_test : array-like or torch.Tensor
            The test points (a few: each gets a row of the figure).
        X, y : array-like or torch.Tensor, default=None
            The training points to rank; None ranks the data given to ``fit``.
        k : int, default=5
            Helpful and harmful points shown per test point.
        normalize : {None, "relatif", "cosine"}, default=None
            Rank by normalized influences (see ``influences``): ``"relatif"``
            shows the points that matter to each test point in particular,
            rather than the points with the largest gradients.
        shape : tuple of int, default=None
            Per-sample image shape (for example ``(8, 8)``) to draw inputs as
            images; None draws bar charts.
        ax : matplotlib Axes or array of Axes, default=None
            Where to draw (see :meth:`plot`).

        Returns
        -------
        display : InfluenceDisplay
            The display, drawn.
        """
        kwargs = {} if normalize is None else {"normalize": normalize}  # an ensemble or older estimator without it
        indices, values = estimator.top_influences(X_test, y_test, k=k, X=X, y=y, which="both", **kwargs)
        indices, values = _numpy(indices), _numpy(values)
        if X is None:
            X, y = estimator._fit_data.arrays() if estimator._fit_data is not None else (None, None)
        display = cls(indices[:, :k], values[:, :k], indices[:, k:], values[:, k:], X_train=X, y_train=y,
                      X_test=X_test, y_test=y_test, normalize=normalize)
        return display.plot(ax=ax, shape=shape)

    @classmethod
    def from_predictions(cls, influences, *, k=5, X_train=None, y_train=None, X_test=None, y_test=None,
                         normalize=None, shape=None, ax=None):
        """Plot the top influences of an influence matrix computed before.

        Parameters
        ----------
        influences : array-like of shape (n_test, n_train)
            Influence of each training point on each test point.
        k : int, default=5
            Helpful and harmful points shown per test point.
        X_train, y_train, X_test, y_test : array-like, default=None
            Inputs and labels to show.
        normalize : {None, "relatif", "cosine"}, default=None
            How ``influences`` were normalized, to name it on the axes.
        shape : tuple of int, default=None
            Per-sample image shape to draw inputs as images.
        ax : matplotlib Axes or array of Axes, default=None
            Where to draw (see :meth:`plot`).

        Returns
        -------
        display : InfluenceDisplay
            The display, drawn.
        """
        scores = _numpy(influences).astype(np.float64)
        if scores.ndim != 2:
            raise ValueError(f"influences must be a 2-D array (n_test, n_train), got shape {scores.shape}.")
        if not 1 <= k <= scores.shape[1]:
            raise ValueError(f"k must be from 1 to the {scores.shape[1]} training points, got {k}.")
        helpful = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        harmful = np.argsort(scores, axis=1, kind="stable")[:, :k]
        display = cls(helpful, np.take_along_axis(scores, helpful, 1), harmful,
                      np.take_along_axis(scores, harmful, 1), X_train=X_train, y_train=y_train, X_test=X_test,
                      y_test=y_test, normalize=normalize)
        return display.plot(ax=ax, shape=shape)

    def plot(self, ax=None, *, shape=None):
        """Draw the display.

        Parameters
        ----------
        ax : matplotlib Axes or array of Axes, default=None
            Bar charts: one Axes per test point (a single Axes for one test
            point). Images: a grid of ``n_test`` rows and ``2 k + 1``
            columns. None makes a new figure.
        shape : tuple of int, default=None
            Per-sample image shape; needs ``X_train``.

        Returns
        -------
        display : InfluenceDisplay
            This display, with ``figure_`` and ``axes_``.
        """
        plt = _pyplot()
        n_test, k = np.shape(self.helpful_indices)
        if shape is not None:
            if self.X_train is None:
                raise ValueError("Drawing images needs the training inputs (X_train, or an estimator's fitted data).")
            columns = 2 * k + (self.X_test is not None)
            axes = self._axes(plt, ax, (n_test, columns), figsize=(1.3 * columns, 1.5 * n_test))
            self._draw_images(axes, tuple(shape))
        else:
            axes = self._axes(plt, ax, (n_test, 1), figsize=(6, 2.2 * n_test))
            self._draw_bars(axes[:, 0])
        self.axes_ = axes
        self.figure_ = axes.flat[0].figure
        return self

    @staticmethod
    def _axes(plt, ax, grid, figsize):
        if ax is None:
            _, ax = plt.subplots(*grid, figsize=figsize, squeeze=False)
        axes = np.asarray(ax, dtype=object).reshape(-1)
        if axes.size != grid[0] * grid[1]:
            raise ValueError(f"ax must hold {grid[0] * grid[1]} Axes ({grid[0]} x {grid[1]}), got {axes.size}.")
        return axes.reshape(grid)

    def _draw_bars(self, axes):
        for row, ax in enumerate(axes):
            indices = np.concatenate([self.helpful_indices[row], self.harmful_indices[row][::-1]])
            values = np.concatenate([self.helpful_values[row], self.harmful_values[row][::-1]])
            labels = [f"#{int(i)} {_label(self.y_train, int(i))}".strip() for i in indices]
            positions = np.arange(len(values))[::-1]
            colors = ["tab:green" if v >= 0 else "tab:red" for v in values]
            ax.barh(positions, values, color=colors)
            ax.set_yticks(positions, labels)
            ax.axvline(0, color="black", linewidth=0.8)
            title = f"test point {row}"
            if self.y_test is not None:
                title += f" ({_label(self.y_test, row)})"
            ax.set_title(title)
            ax.set_xlabel(f"{_NORMALIZED.get(self.normalize, '')}influence (positive: helpful)")

    def _draw_images(self, axes, shape):
        X_train, X_test = _rows(self.X_train), _rows(self.X_test)
        for row in range(axes.shape[0]):
            column = 0
            if X_test is not None:
                self._image(axes[row, 0], X_test, row, shape, f"test {_label(self.y_test, row)}".strip())
                column = 1
            for kind, indices, values in (("helpful", self.helpful_indices, self.helpful_values),
                                          ("harmful", self.harmful_indices, self.harmful_values)):
                for index, value in zip(indices[row], values[row]):
                    title = f"{_label(self.y_train, int(index))}\n{value:+.3g}".strip()
                    self._image(axes[row, column], X_train, int(index), shape, title,
                                color="tab:green" if kind == "helpful" else "tab:red")
                    column += 1

    @staticmethod
    def _image(ax, X, index, shape, title, color="black"):
        ax.imshow(_numpy(X[index]).reshape(shape), cmap="gray_r")
        ax.set_title(title, fontsize=8, color=color)
        ax.set_xticks([])
        ax.set_yticks([])


class MislabelDisplay:
    """Known mislabelled points found against the fraction of training data inspected.

    Points are inspected in decreasing order of a score: self-influence,
    and, as baselines, the training loss and a random order. The legend
    gives each score's ROC AUC as a detector of the flipped labels.

    Build it with :meth:`from_estimator` or :meth:`from_predictions`.

    Parameters
    ----------
    flipped : ndarray of bool of shape (n_train,)
        Which labels are known to be wrong.
    scores : dict of str to ndarray of shape (n_train,)
        Each ranking's scores, higher inspected first (``"self-influence"``,
        ``"training loss"``).

    Attributes
    ----------
    fraction_inspected_ : ndarray of shape (n_train + 1,)
        0, 1/n, ..., 1.
    fraction_found_ : dict of str to ndarray of shape (n_train + 1,)
        For each score (and ``"random"``, the expectation): the fraction of
        flipped points among the first inspected.
    roc_auc_ : dict of str to float
        Each score's ROC AUC (0.5 for ``"random"``).
    lines_ : dict of str to matplotlib Line2D
        The drawn curves.
    ax_ : matplotlib.axes.Axes
        The Axes drawn on.
    figure_ : matplotlib.figure.Figure
        Its figure.

    See Also
    --------
    InfluenceDisplay : Most helpful and harmful training points.
    skinfl.metrics.mislabel_detection : The same detection, as numbers.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from skinfl.display import MislabelDisplay
    >>> flipped = np.array([True, False, False, True])
    >>> display = MislabelDisplay.from_predictions(flipped, np.array([3.0, 0.1, 0.2, 2.0]))
    >>> display.roc_auc_["self-influence"]
    1.0
    """

    def __init__(self, flipped, scores):
        self.flipped = flipped
        self.scores = scores

    @classmethod
    def from_estimator(cls, estimator, X, y, flipped, *, ax=None):
        """Rank the training points by self-influence and by training loss, and plot.

        Parameters
        ----------
        estimator : BaseInfluence
            A fitted influence estimator.
        X, y : array-like or torch.Tensor
            The training points, with their (partly wrong) labels.
        flipped : array-like
            Indices of the points whose labels are wrong, or a boolean mask.
        ax : matplotlib Axes, default=None
            Where to draw; None makes a new figure.

        Returns
        -------
        display : MislabelDisplay
            The display, drawn.
        """
        self_influence = _numpy(estimator.self_influence(X, y)).astype(np.float64)
        scores = {"self-influence": self_influence, "training loss": training_losses(estimator, X, y)}
        return cls(flipped_mask(flipped, len(self_influence)), scores).plot(ax=ax)

    @classmethod
    def from_predictions(cls, flipped, self_influence, *, training_loss=None, ax=None):
        """Plot rankings computed before.

        Parameters
        ----------
        flipped : array-like
            Indices of the points whose labels are wrong, or a boolean mask.
        self_influence : array-like of shape (n_train,)
            Self-influence of each training point.
        training_loss : array-like of shape (n_train,), default=None
            Training loss of each point, the baseline ranking.
        ax : matplotlib Axes, default=None
            Where to draw; None makes a new figure.

        Returns
        -------
        display : MislabelDisplay
            The display, drawn.
        """
        scores = {"self-influence": _numpy(self_influence).astype(np.float64).ravel()}
        if training_loss is not None:
            scores["training loss"] = _numpy(training_loss).astype(np.float64).ravel()
        n = len(scores["self-influence"])
        if any(len(values) != n for values in scores.values()):
            raise ValueError("self_influence and training_loss must have one value per training point.")
        return cls(flipped_mask(flipped, n), scores).plot(ax=ax)

    def plot(self, ax=None):
        """Draw the curves.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Where to draw; None makes a new figure.

        Returns
        -------
        display : MislabelDisplay
            This display, with the fitted attributes set.
        """
        plt = _pyplot()
        flipped = np.asarray(self.flipped, dtype=bool)
        if flipped.all() or not flipped.any():
            raise ValueError("flipped must mark some but not all training points.")
        n = len(flipped)
        self.fraction_inspected_ = np.arange(n + 1) / n
        self.fraction_found_, self.roc_auc_ = {}, {}
        for name, values in self.scores.items():
            order = np.argsort(-values, kind="stable")
            self.fraction_found_[name] = np.concatenate([[0.0], np.cumsum(flipped[order]) / flipped.sum()])
            self.roc_auc_[name] = float(roc_auc_score(flipped, values))
        self.fraction_found_["random"] = self.fraction_inspected_.copy()
        self.roc_auc_["random"] = 0.5
        if ax is None:
            _, ax = plt.subplots(figsize=(5, 4))
        self.lines_ = {}
        for name, found in self.fraction_found_.items():
            style = {"linestyle": "--", "color": "gray"} if name == "random" else {}
            (self.lines_[name],) = ax.plot(self.fraction_inspected_, found,
                                           label=f"{name} (ROC AUC {self.roc_auc_[name]:.3f})", **style)
        ax.set_xlabel("fraction of training data inspected")
        ax.set_ylabel("fraction of flipped labels found")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.legend(loc="lower right")
        self.ax_ = ax
        self.figure_ = ax.figure
        return self
