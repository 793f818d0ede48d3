"""The demo page behind demo.py: a gradio app around ``predictor.Predictor``.

The user uploads an image and types expressions, one per line. Each expression's result is
what predict.py writes (``predictor.write_prediction``): the panel (mask outline and fill |
position-prior heat map with its colour bar, the expression below) and the mask, overlay and
prior PNGs. The page shows the panels of all expressions stacked into one picture, offers
the PNGs for download and lists per expression the highest pixel probability, the mean
probability inside the mask, the mask's area and the predictor's warnings (empty
expression, truncated expression, empty mask).

When the model was trained on RefShapes, a few images of the generated raw data under the
config's data_dir (validation split first) come preloaded as examples with their expressions.

gradio is an optional extra (requirements-demo.txt); only ``build_app`` and ``serve`` import
it, so the rest of this module (and its unit tests) works without it.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lts_jax import visualize
from lts_jax.predictor import Prediction, Predictor, load_image, output_paths, write_prediction

# More lines than this is almost certainly a paste mistake; it also bounds the batch.
MAX_EXPRESSIONS = 16
# Uploads are shrunk to this longer side first: the model sees image_size pixels anyway, and
# full-size mask/overlay/prior PNGs of a 12-megapixel photo would take seconds to encode.
MAX_SIDE = 1024
# Rows per forward pass. Compiling one more batch shape costs ~12 s on a CPU while running a
# padded row of the RefShapes models costs milliseconds, so every request uses this one.
BATCH = 4
NUM_EXAMPLES = 3
EXPRESSIONS_PER_EXAMPLE = 3
# Splits the model most likely did not train on come first.
_EXAMPLE_SPLITS = ("validation", "testA", "testB", "test", "train")


@dataclasses.dataclass(frozen=True)
class Example:
    """An example image with expressions of objects in it."""

    image: Path
    expressions: tuple[str, ...]


def parse_expressions(text: str | None) -> list[str]:
    """One expression per non-blank line, stripped."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def predict_in_batches(predictor: Predictor, image: np.ndarray, expressions: Sequence[str],
                       batch: int = BATCH) -> list[Prediction]:
    """``predictor.predict`` over ``batch`` expressions at a time, the last batch padded by
    repeating its last expression (the padding rows are dropped), so the forward pass is
    compiled for one batch shape only."""
    if not expressions:
        raise ValueError("give at least one expression")
    out: list[Prediction] = []
    for start in range(0, len(expressions), batch):
        chunk = list(expressions[start:start + batch])
        padded = chunk + [chunk[-1]] * (batch - len(chunk))
        out += predictor.predict(image, padded)[:len(chunk)]
    return out


def shrink(image: np.ndarray, max_side: int = MAX_SIDE) -> np.ndarray:
    """``image`` scaled down so its longer side is at most ``max_side`` (never enlarged)."""
    hw = visualize.display_size(image.shape[:2], low=1, high=max_side)
    return visualize.resize(image, hw)


def stack_panels(panels: Sequence[np.ndarray], gap: int = 17, top: int = 0) -> np.ndarray:
    """uint8 RGB panels one below the other on white (narrower ones padded on the right),
    ``gap`` pixels apart with a grey rule in the middle, below ``top`` white rows: one
    picture shows every expression at full size (a gradio gallery crops wide pictures
    into squares)."""
    if not panels:
        raise ValueError("no panels to stack")
    width = max(p.shape[1] for p in panels)
    rule = np.full((gap, width, 3), 255, np.uint8)
    rule[gap // 2] = 200
    rows: list[np.ndarray] = [np.full((top, width, 3), 255, np.uint8)]
    for k, panel in enumerate(panels):
        if k:
            rows.append(rule)
        pad = np.full((panel.shape[0], width - panel.shape[1], 3), 255, np.uint8)
        rows.append(np.concatenate([panel, pad], axis=1))
    return np.concatenate(rows, axis=0)


def raw_refshapes_root(config: Any) -> Path | None:
    """The generated RefShapes raw folder (refshapes/ + train2014/) for ``config``'s data_dir,
    or None when the model was not trained on RefShapes or the folder is missing."""
    if str(config.data.get("dataset", "")) != "refshapes":
        return None
    from tfds_refcoco.builder import REFSHAPES_RAW_DIR, raw_refshapes_dir

    num_images = int(config.data.get("refshapes_num_images", 0) or 0) or None
    preferred = raw_refshapes_dir(config.data.data_dir, num_images)
    # Any generated size will do when the one trained on is gone.
    others = sorted(Path(config.data.data_dir, REFSHAPES_RAW_DIR).glob("n*"))
    for root in [preferred, *others]:
        if (root / "refshapes" / "instances.json").is_file():
            return root
    return None


def find_examples(config: Any, limit: int = NUM_EXAMPLES,
                  per_image: int = EXPRESSIONS_PER_EXAMPLE) -> list[Example]:
    """Up to ``limit`` RefShapes images (held-out splits first) with one expression of each
    of up to ``per_image`` referred objects; [] when there are none."""
    root = raw_refshapes_root(config)
    if root is None:
        return []
    from tfds_refcoco import refer

    try:
        by_split = refer.read_refer(root, "refshapes", "unc")
    except refer.ReferFormatError:
        return []  # half-written or foreign data: the demo works without examples
    order = [s for s in _EXAMPLE_SPLITS if s in by_split] + sorted(
        s for s in by_split if s not in _EXAMPLE_SPLITS)
    by_image: dict[Path, list[str]] = {}
    for split in order:
        for obj in by_split[split]:
            if obj.expressions and obj.image_path.is_file():
                by_image.setdefault(obj.image_path, []).append(obj.expressions[0])
    return [Example(path, tuple(texts[:per_image]))
            for path, texts in list(by_image.items())[:limit]]


def _markdown_text(text: str) -> str:
    """``text`` with Markdown/HTML meta-characters escaped, for a table cell."""
    return re.sub(r"([\\`*_{}\[\]<>()#+\-.!|~])", r"\\\1", text.replace("\n", " "))


def summary_markdown(predictions: Sequence[Prediction], threshold: float) -> str:
    """A Markdown table: per expression the highest pixel probability, the mean probability
    inside the mask, the mask's area; then the warnings, one bullet each."""
    rows = ["| # | expression | max probability | mean probability in mask | mask |",
            "|---|---|---|---|---|"]
    notes = []
    for i, p in enumerate(predictions, start=1):
        top = float(p.probability.max()) if p.probability.size else 0.0
        area = int(p.mask.sum())
        inside = f"{float(p.probability[p.mask].mean()):.3f}" if area else "-"
        share = 100.0 * area / p.mask.size if p.mask.size else 0.0
        shown = _markdown_text(p.expression) if p.expression.strip() else "(empty)"
        rows.append(f"| {i} | {shown} | {top:.3f} | {inside} | {area:,} px ({share:.1f}%) |")
        notes += [f"- {i}: {_markdown_text(w)}" for w in p.warnings]
    text = "\n".join(rows) + f"\n\nA pixel belongs to the mask when its probability is at " \
        f"least {threshold:g}."
    if notes:
        text += "\n\n**Warnings**\n\n" + "\n".join(notes)
    return text


@dataclasses.dataclass(frozen=True)
class DemoResult:
    """What one click shows: the stacked panels, the summary table and every PNG written
    (paths)."""

    panels: str  # the expressions' panels, stacked top to bottom, as one PNG
    summary: str
    files: list[str]


class Demo:
    """The prediction behind the page; no gradio here, so it is testable on its own.

    Every request writes predict.py's four PNGs per expression into its own folder under
    ``workspace``.
    """

    def __init__(self, predictor: Predictor, workspace: str | Path, *,
                 examples: Sequence[Example] = ()) -> None:
        self.predictor = predictor
        self.workspace = Path(workspace)
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.examples = list(examples)
        self._ready = threading.Event()
        self._ready.set()  # until warm_up starts
        self._warm_up: threading.Thread | None = None

    def warm_up(self) -> None:
        """Compiles the forward pass, so that the first click is quick; requests wait for it.
        Runs in a thread: the compilation overlaps gradio's start-up."""

        def run() -> None:
            try:
                size = self.predictor.image_size
                predict_in_batches(self.predictor, np.zeros((size, size, 3), np.uint8),
                                   ["warm up"])
            finally:  # a failure shows again, to the user, on the first request
                self._ready.set()

        self._ready.clear()
        self._warm_up = threading.Thread(target=run, name="warm-up")
        self._warm_up.start()

    def wait_ready(self) -> None:
        """Returns when the warm-up is done (at once when none runs). A process must not
        exit while XLA compiles in another thread: it aborts."""
        if self._warm_up is not None:
            self._warm_up.join()

    def segment(self, image_path: str | Path | None, text: str | None) -> DemoResult:
        """Segments the image at ``image_path`` once per line of ``text``. Raises ValueError
        (no image, no or too many expressions, unreadable image) with a message for the
        user."""
        if not image_path:
            raise ValueError("upload an image first (or pick an example)")
        expressions = parse_expressions(text)
        if not expressions:
            raise ValueError("type at least one expression, one per line")
        if len(expressions) > MAX_EXPRESSIONS:
            raise ValueError(f"{len(expressions)} expressions; at most {MAX_EXPRESSIONS} "
                             "per image")
        try:
            image = shrink(load_image(image_path))
        except FileNotFoundError as err:
            raise ValueError(str(err)) from err
        self._ready.wait()
        predictions = predict_in_batches(self.predictor, image, expressions)
        out_dir = Path(tempfile.mkdtemp(prefix="request_", dir=self.workspace))
        panels, files = [], []
        for i, p in enumerate(predictions):
            paths = write_prediction(image, p, output_paths(out_dir, image_path, i,
                                                            p.expression))
            with Image.open(paths["panel"]) as panel:
                panels.append(np.asarray(panel.convert("RGB")))
            files += [str(paths[kind]) for kind in ("mask", "overlay", "prior", "panel")]
        # top: room for the image viewer's buttons above the first colour bar's label
        stacked = visualize.save_png(stack_panels(panels, top=30),
                                     out_dir / f"{Path(image_path).stem}_panels.png")
        return DemoResult(str(stacked), summary_markdown(predictions, self.predictor.threshold),
                          files)


def header_markdown(workdir: str | Path, which: str, step: int, predictor: Predictor) -> str:
    """The page's title and what model it runs."""
    config = predictor.config
    return (
        "# Locate then Segment: referring image segmentation\n"
        "Upload an image, type one or more expressions (one per line) and press **Segment**. "
        "Each panel shows the predicted mask (outline and fill) beside the position prior "
        "(heat map scaled 0..max, with its colour bar), the expression below.\n\n"
        f"Model: `{workdir}`, {which} checkpoint (step {step}), trained on "
        f"{config.data.get('dataset', '?')}, {predictor.image_size} px input."
    )


def build_app(demo: Demo, header: str) -> Any:
    """The gradio Blocks page for ``demo``."""
    import gradio as gr

    def run(image_path: str | None, text: str | None) -> tuple[str, str, list[str]]:
        try:
            result = demo.segment(image_path, text)
        except ValueError as err:
            raise gr.Error(str(err)) from err
        return result.panels, result.summary, result.files

    # delete_cache: gradio's copies of uploads and results older than an hour go, hourly.
    with gr.Blocks(title="LTS-JAX demo", delete_cache=(3600, 3600)) as app:
        # The outputs exist before the examples that fill them; they are placed (render)
        # in the right-hand column below. png: webp would blur the thin mask outline and
        # the caption text.
        panels = gr.Image(label="prediction | position prior, one panel per expression",
                          show_label=False, type="filepath", format="png", interactive=False,
                          buttons=["download", "fullscreen"], elem_id="panels", render=False)
        summary = gr.Markdown(elem_id="summary", render=False)
        files = gr.File(label="mask, overlay, prior and panel PNGs (as predict.py writes "
                        "them)", file_count="multiple", elem_id="files", render=False)
        outputs = [panels, summary, files]
        gr.Markdown(header)
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"],
                                 elem_id="image")
                text = gr.Textbox(label="Expressions, one per line", lines=4,
                                  placeholder="the big red circle\nthe star on the left",
                                  elem_id="expressions")
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                if demo.examples:  # a click fills the inputs and segments at once
                    gr.Examples([[str(e.image), "\n".join(e.expressions)]
                                 for e in demo.examples],
                                inputs=[image, text], outputs=outputs, fn=run,
                                run_on_click=True, cache_examples=False,
                                label="RefShapes examples (click one)", elem_id="examples")
            with gr.Column(scale=3):
                panels.render()
                summary.render()
                with gr.Accordion("Download the PNGs", open=False, elem_id="downloads"):
                    files.render()
        button.click(run, [image, text], outputs)
    return app


def copy_examples(examples: Sequence[Example], folder: str | Path) -> list[Example]:
    """The examples with their images copied into ``folder``: gradio serves example files
    only from the working or temporary directory, and data_dir may be anywhere."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k, e in enumerate(examples):
        target = folder / f"{k:02d}_{e.image.name}"
        shutil.copyfile(e.image, target)
        out.append(Example(target, e.expressions))
    return out


def serve(predictor: Predictor, step: int, *, workdir: str | Path, which: str,
          host: str, port: int) -> None:
    """Builds the page and serves it at http://host:port until interrupted."""
    # SIGTERM (kill, a service manager, the test) ends the server like Ctrl-C does, so the
    # finally below removes the workspace.
    if threading.current_thread() is threading.main_thread():  # signal() needs it
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    workspace = Path(tempfile.mkdtemp(prefix="lts_demo_"))
    examples = copy_examples(find_examples(predictor.config), workspace / "examples")
    demo = Demo(predictor, workspace / "results", examples=examples)
    demo.warm_up()  # compiles while gradio loads
    try:
        app = build_app(demo, header_markdown(workdir, which, step, predictor))
        # ssr_mode off: server-side rendering would need Node.js.
        app.launch(server_name=host, server_port=port, allowed_paths=[str(workspace)],
                   show_error=True, ssr_mode=False)
    finally:
        demo.wait_ready()
        shutil.rmtree(workspace, ignore_errors=True)


def check_port(host: str, port: int) -> None:
    """Raises OSError naming the address when ``port`` cannot be served on ``host``, so a
    taken port fails in a second, not after loading the model."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as err:
            raise OSError(f"cannot serve on {host}:{port} ({err.strerror or err}); is another "
                          "server using it? Pass a free --port") from err
