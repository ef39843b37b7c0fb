"""A PACS as an image source, over DICOMweb: QIDO-RS finds instances, WADO-RS fetches them.

An instance is named by a URL, ``dicomweb+http://HOST:PORT/dicom-web/studies/S/series/E/instances/I``,
which is what an index row stores as its path: a hit names the study, series and SOP instance
to open in the viewer, and ``midol encode`` / ``midol index`` treat the URL like a file path
(decoding workers fetch, hash and decode the same bytes). ``dicomweb-client`` speaks the
protocol; requests' transport retries dropped connections and 5xx answers with back-off.

Credentials come from the environment (``MIDOL_DICOMWEB_USER``, ``MIDOL_DICOMWEB_PASSWORD``) or,
when those are unset, from a netrc entry for the host; never from the command line.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import DICOMwebError, ImageReadError
from .image_io import RawImage, file_frames

SCHEMES = ("dicomweb+http://", "dicomweb+https://")
USER_VARIABLE, PASSWORD_VARIABLE = "MIDOL_DICOMWEB_USER", "MIDOL_DICOMWEB_PASSWORD"
RETRIED_STATUSES = (429, 500, 502, 503, 504)
_INSTANCE = re.compile(r"^(?P<service>.+)/studies/(?P<study>[0-9.]+)/series/(?P<series>[0-9.]+)/instances/(?P<sop>[0-9.]+)$")
_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber")
_TAGS = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "SOPInstanceUID": "00080018",
         "InstanceNumber": "00200013"}


def is_dicomweb(location: str) -> bool:
    """Whether ``location`` names a DICOMweb service or instance (``dicomweb+http(s)://...``)."""
    return str(location).startswith(SCHEMES)


@dataclass(frozen=True)
class Instance:
    """One SOP instance of a DICOMweb service (``service`` without the ``dicomweb+`` prefix)."""

    service: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str

    @property
    def url(self) -> str:
        return f"dicomweb+{self.service}/studies/{self.study_uid}/series/{self.series_uid}/instances/{self.sop_instance_uid}"

    @classmethod
    def parse(cls, url: str) -> Instance:
        match = _INSTANCE.match(url.removeprefix("dicomweb+")) if is_dicomweb(url) else None
        if match is None:
            raise ValueError(f"{url}: not a DICOMweb instance URL (dicomweb+http://HOST/PATH/studies/S/series/E/instances/I)")
        return cls(**dict(zip(("service", "study_uid", "series_uid", "sop_instance_uid"), match.groups())))

    def uids(self) -> dict[str, str]:
        return {"study_uid": self.study_uid, "series_uid": self.series_uid, "sop_instance_uid": self.sop_instance_uid}


def instance_uids(path: str) -> dict[str, str]:
    """The Study, Series and SOP Instance UIDs a row's path names ({} for a file path)."""
    try:
        return Instance.parse(path).uids()
    except ValueError:
        return {}


class DICOMwebSource:
    """A DICOMweb service: ``url`` is ``dicomweb+http(s)://HOST:PORT/ROOT`` (Orthanc: ``/dicom-web``).

    ``timeout`` (seconds) bounds each request; ``retries`` is how often a dropped connection or a
    429/5xx answer is tried again, waiting 0.5, 1, 2, ... s in between."""

    def __init__(self, url: str, timeout: float = 30.0, retries: int = 4) -> None:
        if not is_dicomweb(url):
            raise ValueError(f"{url}: a DICOMweb source is written dicomweb+http://HOST:PORT/dicom-web")
        try:
            import requests
            from dicomweb_client.api import DICOMwebClient
            from requests.adapters import HTTPAdapter
            from urllib3.util import Retry
        except ImportError:
            raise ImportError("a DICOMweb source needs dicomweb-client: pip install 'midol-hub[dicomweb]'") from None
        self.service = url.removeprefix("dicomweb+").rstrip("/")
        self.timeout = timeout
        session = requests.Session()  # with no auth set, requests reads a netrc entry for the host
        user, password = os.environ.get(USER_VARIABLE), os.environ.get(PASSWORD_VARIABLE)
        if user is not None or password is not None:
            session.auth = (user or "", password or "")
        retry = Retry(total=retries, connect=retries, read=retries, status=retries, backoff_factor=0.5,
                      status_forcelist=RETRIED_STATUSES, allowed_methods=None, raise_on_status=False)
        for prefix in ("http://", "https://"):
            session.mount(prefix, HTTPAdapter(max_retries=retry))
        self.client = DICOMwebClient(self.service, session=session, timeout=timeout)
        self.client.set_http_retry_params(retry=False)  # one retry policy: the transport's

    def instances(self, *, modality: str | None = None, study_date: str | None = None,
                  study_uids: Sequence[str] = (), series_uids: Sequence[str] = ()) -> list[Instance]:
        """The instances QIDO-RS finds, in study, series, instance-number order. ``study_date`` is
        a DICOM date or range (``20240101-20241231``); UID lists keep instances of those only."""
        filters: dict[str, Any] = {}
        if modality:
            filters["Modality"] = modality
        if study_date:
            filters["StudyDate"] = study_date
        scopes = [{"StudyInstanceUID": uid} for uid in study_uids] or [{}]
        found: dict[str, tuple] = {}
        for scope in scopes:
            for series in series_uids or [None]:
                extra = {} if series is None else {"SeriesInstanceUID": series}
                answers = self._call("search instances (QIDO-RS)", self.client.search_for_instances,
                                     fields=list(_FIELDS), search_filters={**filters, **scope, **extra}, get_remaining=True)
                for answer in answers:
                    uids = {name: _value(answer, name) for name in _FIELDS}
                    if not all(uids[name] for name in _FIELDS[:3]):
                        continue
                    found[uids["SOPInstanceUID"]] = (uids["StudyInstanceUID"], uids["SeriesInstanceUID"],
                                                     int(uids["InstanceNumber"] or 0), uids["SOPInstanceUID"])
        return [Instance(self.service, study, series, sop) for study, series, _, sop in sorted(found.values())]

    def fetch(self, instance: Instance) -> bytes:
        """The instance as a DICOM file, in the transfer syntax the server stores (WADO-RS)."""
        import pydicom

        dataset = self._call(f"fetch {instance.sop_instance_uid} (WADO-RS)", self.client.retrieve_instance,
                             instance.study_uid, instance.series_uid, instance.sop_instance_uid,
                             media_types=(("application/dicom", "*"),), missing=instance.url)
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
        return buffer.getvalue()

    def _call(self, what: str, function: Any, *args: Any, missing: str | None = None, **kwargs: Any) -> Any:
        """``function``'s answer; a server that cannot be reached or refuses raises
        :class:`DICOMwebError` in one line naming it (``missing``: an instance the server no
        longer has is an :class:`ImageReadError` of that URL instead)."""
        import requests

        try:
            return function(*args, **kwargs)
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status in (401, 403):
                raise DICOMwebError(
                    f"{self.service} refused the credentials (HTTP {status}) to {what}; set {USER_VARIABLE} and "
                    f"{PASSWORD_VARIABLE}, or a netrc entry for its host") from None
            if status == 404 and missing is not None:
                raise ImageReadError(missing, "the server has no such instance (deleted since it was listed?)") from None
            raise DICOMwebError(f"{self.service}: HTTP {status} to {what}") from None
        except requests.Timeout:
            raise DICOMwebError(f"{self.service}: no answer within {self.timeout:g} s to {what}") from None
        except requests.ConnectionError:
            raise DICOMwebError(f"{self.service}: unreachable (connection refused or dropped) to {what}; "
                                "check the address and that the server is running") from None


def read_instance(url: str, frame: int | None = None) -> RawImage:
    """Fetch a DICOMweb instance (by its URL, as index rows store it) and decode it, or its frame."""
    instance = Instance.parse(url)
    data = DICOMwebSource("dicomweb+" + instance.service).fetch(instance)
    return next(iter(file_frames(url, frame, data)))


def _value(answer: dict[str, Any], name: str) -> str:
    values = answer.get(_TAGS[name], {}).get("Value") or [""]
    return str(values[0])
