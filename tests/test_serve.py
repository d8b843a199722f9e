import io
import shutil
import socket
import threading
import time

import pytest
import torch
from PIL import Image

from taxoclip import ClassTable
from taxoclip.data.preprocess import Preprocess
from taxoclip.inference.predict import Predictor

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from taxoclip.apps.serve import create_app  # noqa: E402

TABLE = ClassTable.from_records(
    [
        {"id": "1", "genus": "Rosa", "specific_epithet": "canina", "common_name": "dog rose"},
        {"id": "2", "genus": "Tulipa", "specific_epithet": "sylvestris"},
    ],
    origin="test",
)


def jpeg(size=(60, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture
def client():
    predictor = Predictor(TABLE, Preprocess(size=32), lambda p: torch.tensor([[0.8, 0.2]] * len(p)))
    return TestClient(create_app(predictor, model_name="test", max_file_bytes=200_000, max_files=3))


def test_page_info_and_a_prediction(client):
    assert "What species is this?" in client.get("/").text
    assert client.get("/api/info").json()["classes"] == 2
    response = client.post("/api/predict", files=[("files", ("rose.jpg", jpeg(), "image/jpeg"))])
    assert response.status_code == 200
    result = response.json()["results"][0]
    assert result["source"] == "rose.jpg" and result["top"][0]["name"] == "dog rose"
    assert result["confident"]["text"] == "Rosa canina (species)"


def test_bad_uploads_get_4xx_and_the_server_keeps_serving(client):
    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, format="PNG", optimize=True)  # 81 Mpx: over the pixel limit
    cases = [
        ([("files", ("notes.jpg", b"just text", "image/jpeg"))], 415, "not an image"),
        ([("files", ("empty.jpg", b"", "image/jpeg"))], 400, "empty file"),
        ([("files", ("big.jpg", b"\xff" * 300_000, "image/jpeg"))], 413, "larger than"),
        ([("files", ("bomb.png", bomb.getvalue(), "image/png"))], 413, "too many pixels"),
        ([("files", (f"{i}.jpg", jpeg(), "image/jpeg")) for i in range(4)], 413, "at most 3"),
    ]
    for files, status, message in cases:
        response = client.post("/api/predict", files=files)
        assert response.status_code == status, (message, response.text)
        assert message in response.json()["error"]
    assert client.post("/api/predict").status_code == 422
    assert client.post("/api/predict", files=[("files", ("ok.jpg", jpeg(), "image/jpeg"))]).status_code == 200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_real_browser_identifies_a_real_flower_photo(quick_demo, flowers, tmp_path):
    """Headless Chromium opens the page, uploads a real photo, and sees the right species."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (uses Debian's chromium)")
    import uvicorn

    import taxoclip
    from taxoclip.inference.predict import torch_predictor

    model = taxoclip.load(quick_demo / "model")
    class_id = model.classes.ids[2]
    expected = model.classes.rows[2]["scientific_name"]
    photo = sorted((flowers / "valid" / class_id).glob("*.jpg"))[0]
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(torch_predictor(model), model_name="flowers"), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.05)
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium,
                args=[
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    "--disable-quic",
                ],
            )
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_function("document.getElementById('about').textContent.includes('species')")
            page.set_input_files("#files", str(photo))
            answer = page.wait_for_selector("[data-testid=answer]", timeout=30_000)
            assert expected in answer.inner_text()
            page.screenshot(path=str(tmp_path / "page.png"))
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
