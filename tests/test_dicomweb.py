"""A PACS as an index source: a real Orthanc with its DICOMweb plugin on a free local port, real
DICOM files (pydicom's and ones written from $MIDOL_DATA images, a multi-frame OCT volume
among them), indexed over QIDO-RS / WADO-RS and compared with the index of the same files."""

from __future__ import annotations

import gc
import http.server
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from midol_hub import load_model
from midol_hub.app import CaseViewer
from midol_hub.dicomweb import DICOMwebSource, Instance
from midol_hub.errors import DICOMwebError
from midol_hub.search import ImageIndex

from .helpers import free_port, midol, start_midol, write_dicom

ORTHANC, PLUGIN = "/usr/sbin/Orthanc", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
USER, PASSWORD = "midol", "pacs-secret"
IMAGES = {"OP": "fundus/idrid_segmentation_train_cropped/IDRiD_01.jpg", "DMS": "dermoscopy/isic_uda1_fullres/ISIC_0000001.jpg",
          "DX": "xray/nih_chestxray14_examples/00000001_000.png"}
OCT_SCANS = ["oct/kermany_oct2017_samples_b/test_cnv.jpeg", "oct/kermany_oct2017_samples_b/test_dme.jpeg",
             "oct/kermany_oct2017_samples_b/test_drusen.jpeg"]


class Orthanc:
    """An Orthanc server with the DICOMweb plugin, HTTP only, on 127.0.0.1, its storage in ``root``."""

    def __init__(self, root: Path) -> None:
        missing = [path for path in (ORTHANC, PLUGIN) if not Path(path).exists()]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} missing: apt-get install orthanc orthanc-dicomweb (.ci/run does)")
        self.root, self.port = root, free_port()
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "midol-test", "HttpPort": self.port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
            "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"), "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD}, "Plugins": [PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}))
        self.process: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"dicomweb+http://127.0.0.1:{self.port}/dicom-web"

    def start(self) -> None:
        self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/system", auth=(USER, PASSWORD), timeout=2).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer on port {self.port} within 60 s")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None

    def upload(self, path: Path) -> None:
        answer = requests.post(f"http://127.0.0.1:{self.port}/instances", data=path.read_bytes(), auth=(USER, PASSWORD), timeout=30)
        answer.raise_for_status()


@pytest.fixture(scope="module")
def dicom_files(tmp_path_factory, data_root) -> Path:
    """Real DICOMs: pydicom's CT and MR, a fundus photo (OP), a dermoscopy image (DMS), a chest
    radiograph (DX), and a 3-frame OCT volume of real B-scans (OPT), in two studies."""
    root = tmp_path_factory.mktemp("dicom")
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(get_testdata_file(name), root / name)
    studies = [generate_uid(), generate_uid()]
    for number, (code, source) in enumerate(IMAGES.items()):
        image = Image.open(data_root / source)
        image.thumbnail((384, 384))
        pixels = np.asarray(image.convert("L" if code == "DX" else "RGB"))
        write_dicom(root / f"{code}.dcm", pixels, code, StudyInstanceUID=studies[0], SeriesInstanceUID=generate_uid(),
                    InstanceNumber=str(number + 1))
    scans = [np.asarray(Image.open(data_root / scan).convert("L").resize((256, 256))) for scan in OCT_SCANS]
    write_dicom(root / "OPT.dcm", np.stack(scans), "OPT", StudyInstanceUID=studies[1], SeriesInstanceUID=generate_uid(),
                InstanceNumber="1")
    return root


@pytest.fixture(scope="module")
def pacs(tmp_path_factory, dicom_files):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    for path in sorted(dicom_files.glob("*.dcm")):
        server.upload(path)
    yield server
    server.stop()


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv("MIDOL_DICOMWEB_USER", USER)
    monkeypatch.setenv("MIDOL_DICOMWEB_PASSWORD", PASSWORD)


@pytest.fixture(scope="module")
def disk_index(tmp_path_factory, dicom_files) -> Path:
    index = tmp_path_factory.mktemp("disk") / "index"
    result = midol("index", "build", str(dicom_files), "--index", str(index), "--frames", "all", "--workers", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    return index


def rows(index: Path) -> dict[tuple[str, int], tuple[str, str, np.ndarray]]:
    """(content hash, frame) -> (path, modality, embedding) of every row of a FAISS-backed index."""
    with sqlite3.connect(index / "rows.sqlite") as db:
        return {(sha, frame): (path, modality, np.frombuffer(blob, dtype=np.float32))
                for path, sha, frame, modality, blob in db.execute("SELECT path, sha256, frame, modality, embedding FROM rows")}


def assert_same_rows(pacs_index: Path, disk_index: Path, dicom_files: Path) -> None:
    over_pacs, on_disk = rows(pacs_index), rows(disk_index)
    assert set(over_pacs) == set(on_disk) and len(on_disk) == 8  # 5 single-frame files + 3 OCT frames
    sop_of_file = {str(path.resolve()): pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
                   for path in dicom_files.glob("*.dcm")}
    for key, (url, modality, embedding) in over_pacs.items():
        path, disk_modality, disk_embedding = on_disk[key]
        assert Instance.parse(url).sop_instance_uid == sop_of_file[path]  # the row names the instance of that file
        assert modality == disk_modality
        np.testing.assert_allclose(embedding, disk_embedding, atol=1e-5)


@pytest.fixture(scope="module")
def pacs_index(pacs, tmp_path_factory) -> Path:
    index = tmp_path_factory.mktemp("pacs") / "cases"
    environment = {**os.environ, "MIDOL_DICOMWEB_USER": USER, "MIDOL_DICOMWEB_PASSWORD": PASSWORD, "OMP_NUM_THREADS": "1"}
    result = midol("index", "build", pacs.url, "--index", str(index), "--frames", "all", "--workers", "1", env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    return index


def test_an_index_built_over_dicomweb_equals_the_index_of_the_same_files(pacs, pacs_index, credentials, disk_index,
                                                                          dicom_files):
    index = pacs_index
    assert_same_rows(index, disk_index, dicom_files)
    modalities = {modality for _, modality, _ in rows(index).values()}
    assert {"fundus", "oct", "dermoscopy", "xray", "unknown"} <= modalities  # the header decided: CT and MR are unknown

    again = midol("index", "add", str(index), pacs.url, "--frames", "all", "--workers", "1")
    assert again.returncode == 0 and "indexed 0 new row(s)" in again.stdout and "(6 file(s) already there)" in again.stdout

    found = midol("search", str(dicom_files / "OP.dcm"), "--index", str(index), "-k", "1", "--json")
    assert found.returncode == 0, found.stderr[-2000:]
    hit = json.loads(found.stdout)[0]["neighbours"][0]
    written = pydicom.dcmread(dicom_files / "OP.dcm", stop_before_pixels=True)
    assert hit["score"] > 0.999 and hit["study_uid"] == written.StudyInstanceUID  # the viewer opens this study
    assert hit["sop_instance_uid"] == written.SOPInstanceUID and hit["series_uid"] == written.SeriesInstanceUID


def test_the_app_shows_pacs_cases_by_their_uids_with_thumbnails_fetched_over_wado(pacs_index, credentials, dicom_files):
    viewer = CaseViewer(load_model("midol-micro"), ImageIndex(pacs_index), k=2)
    report = viewer.analyse(str(dicom_files / "DX.dcm"))
    assert report.modality == "xray" and report.source == "dicom"
    written = pydicom.dcmread(dicom_files / "DX.dcm", stop_before_pixels=True)
    first = report.neighbour_rows[0]
    assert first["case"] == (f"study {written.StudyInstanceUID}, series {written.SeriesInstanceUID}, "
                             f"SOP instance {written.SOPInstanceUID}") and float(first["score"]) > 0.999
    thumbnail, caption = report.neighbours[0]
    assert max(thumbnail.size) == 160 and written.SOPInstanceUID in caption
    stored = np.asarray(pydicom.dcmread(dicom_files / "DX.dcm").pixel_array, dtype=np.float32)
    expected = np.asarray(Image.fromarray(stored.astype(np.uint8)).resize(thumbnail.size, Image.Resampling.LANCZOS))
    assert np.abs(np.asarray(thumbnail, dtype=np.float32) - expected).mean() < 3  # the radiograph itself, from the PACS
    pictures = viewer.pictures
    assert Path(report.routing_map).parent.parent == pictures and Path(report.routing_map).is_file()
    del viewer
    gc.collect()
    assert not pictures.exists()  # the routing maps it drew go with the viewer


def test_qido_filters_choose_the_instances(pacs, credentials, dicom_files):
    source = DICOMwebSource(pacs.url)
    assert len(source.instances()) == 6
    fundus = source.instances(modality="OP")
    assert [i.sop_instance_uid for i in fundus] == [pydicom.dcmread(dicom_files / "OP.dcm").SOPInstanceUID]
    volume = pydicom.dcmread(dicom_files / "OPT.dcm", stop_before_pixels=True)
    assert [i.series_uid for i in source.instances(study_uids=[volume.StudyInstanceUID])] == [volume.SeriesInstanceUID]
    assert len(source.instances(series_uids=[volume.SeriesInstanceUID, fundus[0].series_uid])) == 2
    assert source.fetch(fundus[0]) == (dicom_files / "OP.dcm").read_bytes()  # WADO-RS gives the stored file back


def test_a_server_stopped_mid_build_resumes_to_the_same_rows(pacs, credentials, disk_index, dicom_files, tmp_path):
    index = tmp_path / "cases"
    build = ["index", "build", pacs.url, "--index", str(index), "--frames", "all", "--workers", "0", "--batch-size", "1",
             "--part-size", "1"]
    process = start_midol(*build)
    parts = index / "pending.npz.parts"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts.glob("*.npz")) if parts.exists() else []) < 2:
        time.sleep(0.002)  # poll fast: the rest of the build can finish within a coarser gap
    process.send_signal(signal.SIGSTOP)  # frozen while the server goes away: it stops mid-build, not after
    assert process.poll() is None, "the build finished before the server could be stopped"
    pacs.stop()
    process.send_signal(signal.SIGCONT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    last = stderr.strip().splitlines()[-1]
    assert "unreachable" in last and "--resume" in last and "Traceback" not in stderr
    written = len(list(parts.glob("*.npz")))
    assert 2 <= written < 6  # some instances encoded, not all
    pacs.start()
    resumed = midol(*build, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_rows(index, disk_index, dicom_files)


def test_a_wrong_password_and_an_unreachable_server_are_one_line_errors(pacs, monkeypatch, tmp_path):
    monkeypatch.setenv("MIDOL_DICOMWEB_USER", USER)
    monkeypatch.setenv("MIDOL_DICOMWEB_PASSWORD", "wrong")
    refused = midol("index", "build", pacs.url, "--index", str(tmp_path / "a"))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"midol: error: {pacs.url.removeprefix('dicomweb+')} refused the credentials (HTTP 401) to search instances "
        "(QIDO-RS); set MIDOL_DICOMWEB_USER and MIDOL_DICOMWEB_PASSWORD, or a netrc entry for its host")
    nowhere = f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web"
    unreachable = midol("index", "build", nowhere, "--index", str(tmp_path / "b"))
    assert unreachable.returncode == 1 and "Traceback" not in unreachable.stderr
    assert "unreachable" in unreachable.stderr and nowhere.removeprefix("dicomweb+") in unreachable.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing created


def test_credentials_come_from_a_netrc_file(pacs, monkeypatch, tmp_path):
    monkeypatch.delenv("MIDOL_DICOMWEB_USER", raising=False)
    monkeypatch.delenv("MIDOL_DICOMWEB_PASSWORD", raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert len(DICOMwebSource(pacs.url).instances()) == 6


class FlakyServer(http.server.BaseHTTPRequestHandler):
    """Answers 503 twice, then drops a connection, then gives an empty QIDO-RS answer."""

    requests_seen = 0

    def do_GET(self) -> None:
        FlakyServer.requests_seen += 1
        if FlakyServer.requests_seen <= 2:
            self.send_response(503)
            self.end_headers()
        elif FlakyServer.requests_seen == 3:
            self.close_connection = True  # no answer at all
        else:
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.end_headers()
            self.wfile.write(b"[]")

    def log_message(self, *args) -> None:
        pass


def test_5xx_answers_and_dropped_connections_are_retried_with_back_off():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        started = time.perf_counter()
        assert DICOMwebSource(f"dicomweb+http://127.0.0.1:{server.server_port}/dicom-web").instances() == []
        assert FlakyServer.requests_seen == 4 and time.perf_counter() - started >= 1.0  # waited between tries
        FlakyServer.requests_seen = -10  # now it only fails: the retries run out
        with pytest.raises(DICOMwebError, match=r"HTTP 503 to search instances"):
            DICOMwebSource(f"dicomweb+http://127.0.0.1:{server.server_port}/dicom-web", retries=2).instances()
    finally:
        server.shutdown()

