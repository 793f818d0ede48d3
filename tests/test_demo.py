"""demo.py: the gradio page, served from a tiny workdir and driven in headless Chromium.

Needs the extras of requirements-demo.txt (gradio, playwright) and a Chromium on PATH
(Debian: apt-get install chromium); .ci/run installs them. Outside CI (no CI variable)
the browser test is skipped when one is missing; in CI it fails instead.
"""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_workdir import get_tiny_workdir

from lts_jax import demo_app
from lts_jax.predictor import Prediction

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 120  # imports, checkpoint load, gradio: ~15 s here
RESULT_TIMEOUT_MS = 60_000


def test_parse_expressions():
    assert demo_app.parse_expressions(" the red circle \n\n  \nstar\r\n") == [
        "the red circle", "star"]
    assert demo_app.parse_expressions(None) == []


def test_predict_in_batches_pads_to_one_shape():
    class Fake:
        sizes = []

        def predict(self, image, expressions):
            self.sizes.append(len(expressions))
            return [f"{e}@{image}" for e in expressions]

    fake = Fake()
    out = demo_app.predict_in_batches(fake, "img", list("abcde"), batch=4)
    assert out == ["a@img", "b@img", "c@img", "d@img", "e@img"] and fake.sizes == [4, 4]
    with pytest.raises(ValueError):
        demo_app.predict_in_batches(fake, "img", [])


def test_shrink_only_shrinks():
    small = np.zeros((30, 40, 3), np.uint8)
    assert demo_app.shrink(small, 64) is small
    assert demo_app.shrink(np.zeros((300, 2000, 3), np.uint8), 1000).shape == (150, 1000, 3)


def test_stack_panels():
    a = np.zeros((2, 3, 3), np.uint8)
    b = np.full((4, 5, 3), 7, np.uint8)
    out = demo_app.stack_panels([a, b], gap=3, top=1)
    assert out.shape == (1 + 2 + 3 + 4, 5, 3) and out.dtype == np.uint8
    assert (out[0] == 255).all() and (out[1:3, :3] == 0).all() and (out[1:3, 3:] == 255).all()
    assert (out[4] == 200).all() and (out[6:] == 7).all()
    with pytest.raises(ValueError):
        demo_app.stack_panels([])


def test_check_port_names_a_taken_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            demo_app.check_port("127.0.0.1", port)
    demo_app.check_port("127.0.0.1", port)  # free again


def test_summary_escapes_and_warns():
    mask = np.zeros((2, 2), bool)
    mask[0, 0] = True
    prob = np.array([[0.9, 0.2], [0.1, 0.3]], np.float32)
    pred = Prediction("a | b *c*", mask, prob, prob, warnings=("watch out",))
    text = demo_app.summary_markdown([pred], 0.5)
    assert r"a \| b \*c\*" in text and "| 0.900 | 0.900 | 1 px (25.0%) |" in text
    assert "- 1: watch out" in text and "at least 0.5" in text


def test_examples_come_from_the_raw_refshapes_data(tmp_path_factory):
    from lts_jax.workdir_config import read_config

    config = read_config(str(get_tiny_workdir(tmp_path_factory)))
    examples = demo_app.find_examples(config, limit=2, per_image=3)
    assert len(examples) == 2
    for example in examples:
        assert example.image.is_file() and example.image.suffix == ".jpg"
        assert 1 <= len(example.expressions) <= 3 and all(e.strip() for e in example.expressions)
    copied = demo_app.copy_examples(examples, tmp_path_factory.mktemp("examples"))
    assert [c.expressions for c in copied] == [e.expressions for e in examples]
    assert all(c.image.read_bytes() == e.image.read_bytes()
               for c, e in zip(copied, examples, strict=True))
    config.data.dataset = "refcoco_unc"  # RefShapes pictures would mean nothing to it
    assert demo_app.find_examples(config) == []


def _browser_or_skip():
    """(sync_playwright, chromium path), or skip (fail under CI) naming what is missing."""
    missing = []
    sync_playwright = None
    if importlib.util.find_spec("gradio") is None:  # not imported here: ~6 s
        missing.append("gradio (pip install -r requirements-demo.txt)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("playwright (pip install -r requirements-demo.txt)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        missing.append("chromium (apt-get install chromium)")
    if missing:
        message = "demo test needs " + ", ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_playwright, chromium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """demo.py serving a workdir in a subprocess; ``url()`` waits until it answers."""

    def __init__(self, workdir: Path, tmp: Path) -> None:
        self.address = f"http://127.0.0.1:{_free_port()}/"
        (tmp / "tmpdir").mkdir()
        env = dict(os.environ, JAX_PLATFORMS="cpu", GRADIO_TEMP_DIR=str(tmp / "gradio"),
                   GRADIO_ANALYTICS_ENABLED="False", TMPDIR=str(tmp / "tmpdir"))
        env.pop("XLA_FLAGS", None)  # one CPU device, as a user would run it
        self.log_path = tmp / "server.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "demo.py"), "--workdir", str(workdir),
                 "--host", "127.0.0.1", "--port", self.address.rsplit(":", 1)[1][:-1]],
                cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT)

    def _log(self) -> str:
        return self.log_path.read_text()[-3000:]

    def url(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"demo.py exited ({self.proc.returncode}):\n{self._log()}")
            try:
                with urllib.request.urlopen(self.address, timeout=2) as response:
                    if response.status == 200:
                        return self.address
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"demo.py not serving after {STARTUP_TIMEOUT_S} s:\n{self._log()}")
            time.sleep(0.25)

    def stop(self) -> int | None:
        """Terminates the server; its exit status (None: it had to be killed)."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """demo.py starting on the tiny workdir (the test launches the browser meanwhile)."""
    _browser_or_skip()
    tmp = tmp_path_factory.mktemp("demo")
    server = _Server(get_tiny_workdir(tmp_path_factory), tmp)
    yield server
    assert server.stop() == 0, server._log()  # SIGTERM ends it like Ctrl-C ...
    assert not list((tmp / "tmpdir").glob("lts_demo_*"))  # ... and its workspace goes


def test_demo_page_segments_an_upload_and_an_example(demo_server, tmp_path):
    sync_playwright, chromium = _browser_or_skip()
    upload = tmp_path / "my_upload.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, size=(50, 83, 3), dtype=np.uint8)).save(upload)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.set_default_timeout(RESULT_TIMEOUT_MS)  # a busy shared CPU is slow
            page.goto(demo_server.url())
            page.locator("#image input[type=file]").set_input_files(str(upload))
            page.wait_for_selector("#image img")  # uploaded and previewed
            page.locator("#expressions textarea").fill("the red circle")
            page.locator("#segment").click()
            summary = page.locator("#summary")
            summary.filter(has_text="max probability").wait_for(timeout=RESULT_TIMEOUT_MS)
            assert "the red circle" in summary.inner_text()
            page.wait_for_function(
                "() => [...document.querySelectorAll('#panels img')].some("
                "e => e.complete && e.naturalWidth > 0)", timeout=RESULT_TIMEOUT_MS)
            panel = page.locator("#panels img").first
            assert "my_upload_panels.png" in panel.get_attribute("src")
            # The predictor's panel: the 83 px wide image enlarged, prediction | prior | bar.
            assert panel.evaluate("e => e.naturalWidth") > 2 * 256
            # predict.py's four files per expression are offered for download.
            page.locator("#downloads").get_by_text("Download the PNGs").click()
            files = page.locator("#files").inner_text()
            for kind in ("mask", "overlay", "prior", "panel"):
                assert f"my_upload_00_the-red-circle_{kind}" in files

            # A RefShapes example: one click fills the inputs and segments.
            page.locator("#examples [data-testid='dataset-cell-0-1']").click()
            textarea = page.locator("#expressions textarea")
            page.wait_for_function("() => document.querySelector('#expressions textarea')"
                                   ".value.includes('\\n')")  # the example's lines
            expressions = textarea.input_value().splitlines()
            page.locator("#summary").filter(has_text=expressions[-1]).wait_for(
                timeout=RESULT_TIMEOUT_MS)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#panels img')].some("
                "e => e.complete && e.naturalWidth > 0 && e.src.includes('refshapes_'))",
                timeout=RESULT_TIMEOUT_MS)
            shown = page.locator("#summary").inner_text()
            assert all(e in shown for e in expressions)
        finally:
            browser.close()


def test_demo_needs_a_workdir_that_exists(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    res = subprocess.run([sys.executable, str(REPO / "demo.py"), "--workdir",
                          str(tmp_path / "no_run")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode != 0
    assert "no_run" in res.stderr and "Traceback" not in res.stderr
