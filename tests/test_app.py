"""``midol app`` in a real headless Chromium (Debian's, driven by Selenium): real fundus and OCT
images, a DICOM file and a text file are uploaded, and the answers, the neighbour thumbnails
and the error messages are read from the page. Screenshots of each state go to
``$MIDOL_SCREENSHOTS`` when set (they are looked at before the README shows one)."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from midol_hub import MIDoLConfig, MIDoLForImageClassification, load_model
from midol_hub.app import CaseViewer
from midol_hub.search import ImageIndex

from .helpers import REPO, free_port, midol, write_dicom

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
FUNDUS = "fundus/idrid_segmentation_train_cropped/IDRiD_40.jpg"  # not in the index
OCT = "oct/kermany_oct2017_samples_b/test_cnv.jpeg"  # not in the index
K = 4


@pytest.fixture(scope="module")
def cases(tmp_path_factory, data_root) -> Path:
    """An index of real fundus photos, OCT B-scans (labelled by class) and chest radiographs."""
    root = tmp_path_factory.mktemp("cases")
    files = root / "files"
    files.mkdir()
    for name in ("IDRiD_01.jpg", "IDRiD_02.jpg", "IDRiD_03.jpg", "IDRiD_04.jpg", "IDRiD_05.jpg"):
        shutil.copy(data_root / "fundus/idrid_segmentation_train_cropped" / name, files / name)
    scans = sorted((data_root / "oct/kermany_oct2017_samples_c").glob("*/*.jpeg"))[:12]
    for scan in scans:
        shutil.copy(scan, files / scan.name)
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "class"])
        for path in sorted(files.iterdir()):
            writer.writerow([f"files/{path.name}", path.name.split("-")[0] if path.suffix == ".jpeg" else "fundus photo"])
    result = midol("index", "build", str(files), "--index", str(root / "index"), "--labels", str(root / "labels.csv"),
                   "--workers", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "index"


@pytest.fixture(scope="module")
def app_url(cases):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "midol_hub.cli", "app", "--index", str(cases), "--port", str(port),
                               "-k", str(K), "--max-file-mb", "4"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline and server.poll() is None:
        try:
            if requests.get(url, timeout=2).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.5)
    else:
        server.kill()
        raise RuntimeError(f"midol app did not start: {server.stderr.read()[-2000:]}")
    yield url
    server.terminate()
    server.wait(30)


@pytest.fixture(scope="module")
def browser():
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).exists()]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing: apt-get install chromium chromium-driver (.ci/run does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage",
                 "--window-size=1280,1700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def upload(browser, url: str, *paths: Path) -> None:
    browser.get(url)
    field = wait_for(browser, "input[type=file]", 1, timeout=60)[0]
    field.send_keys("\n".join(str(p) for p in paths))


def wait_for(browser, selector: str, count: int, timeout: float = 180) -> list:
    from selenium.webdriver.common.by import By

    deadline = time.time() + timeout
    while time.time() < deadline:
        found = browser.find_elements(By.CSS_SELECTOR, selector)
        if len(found) >= count:
            return found
        time.sleep(0.25)
    raise AssertionError(f"the page shows {len(found)} of {count} {selector!r} within {timeout} s")


def texts(browser, selector: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return list(dict.fromkeys(e.text for e in browser.find_elements(By.CSS_SELECTOR, selector) if e.text))


def screenshot(browser, name: str, tmp_path: Path) -> Path:
    target = Path(os.environ.get("MIDOL_SCREENSHOTS") or tmp_path) / f"app-{name}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(target))
    assert Image.open(target).size[0] >= 1000  # a real page, not an empty capture
    return target


def test_fundus_and_oct_answers_and_their_neighbours_in_a_browser(app_url, browser, data_root, tmp_path):
    upload(browser, app_url, data_root / FUNDUS, data_root / OCT)
    wait_for(browser, ".case-summary", 2)
    assert texts(browser, ".case-summary") == [f"{Path(FUNDUS).name}: fundus (from the model; confidence 0.98)",
                                               f"{Path(OCT).name}: oct (from the model; confidence 0.99)"]
    thumbnails = wait_for(browser, ".neighbours img", 2 * K)
    assert len(thumbnails) == 2 * K and all(t.get_attribute("naturalWidth") not in (None, "0") for t in thumbnails)
    fundus_table, oct_table = texts(browser, ".neighbour-table table")
    assert fundus_table.count("fundus photo") == K and "IDRiD_0" in fundus_table  # fundus neighbours: the indexed photos
    assert all(kind in ("CNV", "DME", "DRUSEN", "NORMAL") for kind in _label_cells(oct_table))  # OCT neighbours: B-scans
    assert len(wait_for(browser, ".routing-map img", 2)) == 2
    screenshot(browser, "images", tmp_path)


def _label_cells(table: str) -> list[str]:
    return [line.split()[2].removeprefix("class=") for line in table.splitlines()[1:]]


def test_a_dicom_file_is_named_by_its_header_in_a_browser(app_url, browser, data_root, tmp_path):
    volume = np.stack([np.asarray(Image.open(data_root / OCT).convert("L").resize((256, 256)))] * 3)
    path = tmp_path / "volume.dcm"
    write_dicom(path, volume, "OPT")
    upload(browser, app_url, path)
    wait_for(browser, ".case-summary", 1)
    assert texts(browser, ".case-summary") == ["volume.dcm: oct (from the DICOM header; confidence 1.00)"]
    assert len(wait_for(browser, ".neighbours img", K)) == K
    screenshot(browser, "dicom", tmp_path)


def test_a_text_file_and_an_oversized_file_are_messages_in_a_browser(app_url, browser, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image\n")
    upload(browser, app_url, notes)
    wait_for(browser, ".case-error", 1)
    (message,) = texts(browser, ".case-error")
    assert message.startswith("notes.txt: cannot be read: ") and "Traceback" not in browser.page_source
    screenshot(browser, "text-file", tmp_path)
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1600, 1600, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 4 * 2**20
    upload(browser, app_url, big)
    time.sleep(3)
    assert "big.png" not in " ".join(texts(browser, ".case-summary, .case-error"))  # never analysed
    toast = " ".join(texts(browser, ".toast-body, .toast-wrap"))
    assert 'exceed the maximum allowed size of 4.0 Mb: "big.png"' in toast, toast  # Gradio refuses it at upload
    screenshot(browser, "oversized", tmp_path)


def test_the_page_opens_no_path_on_the_server(app_url, browser):
    from selenium.webdriver.common.by import By

    browser.get(app_url)
    wait_for(browser, "input[type=file]", 1, timeout=60)
    assert not browser.find_elements(By.CSS_SELECTOR, "textarea, input[type=text]")  # nowhere to type a path
    for probe in ("gradio_api/file=/etc/passwd", "file=/etc/passwd", "gradio_api/file=../../etc/passwd"):
        answer = requests.get(app_url + probe, timeout=10)
        assert "root:" not in answer.text and answer.status_code in (403, 404), (probe, answer.status_code)


def test_the_viewer_refuses_large_files_and_names_unreadable_ones(cases, data_root, tmp_path):
    model = load_model("midol-micro")
    viewer = CaseViewer(model, ImageIndex(cases), k=3, max_file_bytes=100_000)
    too_big = viewer.analyse(str(data_root / FUNDUS))
    assert too_big.error == "1011 KiB is over this app's limit of 98 KiB per file"  # 1,035,046 vs 100,000 bytes
    assert too_big.summary.startswith(f"**{Path(FUNDUS).name}**: cannot be read: ")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((data_root / OCT).read_bytes()[:2000])
    report = viewer.analyse(str(broken))
    assert report.error and "broken.jpg" not in report.error  # the reason, the page names the file
    fine = viewer.analyse(str(data_root / OCT))
    assert fine.modality == "oct" and len(fine.neighbours) == 3 and Path(fine.routing_map).is_file()
    assert [row["rank"] for row in fine.neighbour_rows] == ["1", "2", "3"] and fine.heatmap is None


def test_the_viewer_draws_a_class_heatmap_when_given_a_classifier(data_root):
    model = load_model("midol-micro")
    config = MIDoLConfig(**{**model.config.to_dict(), "num_labels": 2, "id2label": {0: "normal", 1: "disease"}})
    classifier = MIDoLForImageClassification(config).eval()
    viewer = CaseViewer(model, classifier=classifier)  # its pictures live as long as it does
    report = viewer.analyse(str(data_root / OCT))
    heatmap = Image.open(report.heatmap)
    assert report.neighbours == [] and heatmap.size[0] > 500 and np.asarray(heatmap.convert("L")).std() > 10
