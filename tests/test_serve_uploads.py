"""Reading the files of a multipart/form-data body: the same files as Starlette's form parser reads, and a
clear 4xx for everything else."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import HTTPException
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.datastructures import UploadFile
from starlette.requests import Request

from digitlab.serve_uploads import MAX_PARTS, uploaded_files


def encoded(files: list[tuple[str, tuple[str, bytes, str]]], data: dict | None = None) -> tuple[str, bytes]:
    """The Content-Type and body an HTTP client sends for these form files and fields."""
    request = httpx.Request("POST", "http://localhost/v1/predict", files=files, data=data)
    return request.headers["content-type"], request.read()


def starlette_files(content_type: str, body: bytes) -> tuple[list[str], list[bytes]]:
    """The names and contents of the `files` uploads as Starlette's `Request.form` reads them."""

    async def read() -> tuple[list[str], list[bytes]]:
        async def receive() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"",
                 "headers": [(b"content-type", content_type.encode("latin-1"))]}  # fmt: skip
        form = await Request(scope, receive).form()
        uploads = [upload for upload in form.getlist("files") if isinstance(upload, UploadFile)]
        contents = [await upload.read() for upload in uploads]
        await form.close()
        return [upload.filename for upload in uploads], contents

    return asyncio.run(read())


def status_and_detail(content_type: str, body: bytes, max_images: int = 8) -> tuple[int, str]:
    with pytest.raises(HTTPException) as raised:
        uploaded_files(content_type, body, max_images)
    return raised.value.status_code, raised.value.detail


names = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20)


@settings(max_examples=60, deadline=None)
@given(
    files=st.lists(st.tuples(names, st.binary(max_size=300)), min_size=1, max_size=6),
    others=st.dictionaries(st.sampled_from(["note", "return_image", "x"]), st.text(max_size=30), max_size=2),
)
def test_files_are_read_as_starlettes_form_parser_reads_them(files, others):
    """Any names (Unicode, quotes, spaces) and contents (boundary-like bytes included), other fields around them."""
    content_type, body = encoded([("files", (name, data, "image/png")) for name, data in files], others)
    assert uploaded_files(content_type, body, 8) == starlette_files(content_type, body)


def test_a_file_without_a_name_is_named_by_its_place():
    body = (b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\nA\r\n'
            b'--b\r\nContent-Disposition: form-data; name="files"; filename=""\r\n\r\nB\r\n--b--\r\n')  # fmt: skip
    assert uploaded_files("multipart/form-data; boundary=b", body, 8) == (["a.png", "files[1]"], [b"A", b"B"])


def test_too_many_files_get_413_and_only_the_allowed_ones_are_kept_meanwhile():
    content_type, body = encoded([("files", (f"{i}.png", bytes([i]) * 1000, "image/png")) for i in range(12)])
    status, detail = status_and_detail(content_type, body, max_images=8)
    assert status == 413 and detail == "12 images in one request; send at most 8"


@pytest.mark.parametrize(
    "content_type, body, status, message",
    [
        ("multipart/form-data", b"--b\r\n", 400, "no boundary"),
        ("multipart/form-data; boundary=b", b"not a multipart body", 400, "malformed multipart"),
        ("multipart/form-data; boundary=b", b"--b\r\nbroken header\r\n\r\nA\r\n--b--\r\n", 400, "malformed multipart"),
        ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data\r\n\r\nA\r\n--b--\r\n", 400,
         "no field name"),
        ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="files"\r\n\r\nA\r\n--b--\r\n',
         422, "files[0] is a text field"),
        ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="x"; filename="a"\r\n\r\nA\r\n'
         b"--b--\r\n", 422, "no images"),
        ("multipart/form-data; boundary=b", b'--b\r\nContent-Disposition: form-data; name="files"; filename="a"\r\n\r\nA',
         422, "no images"),  # the body ends inside its only part
    ],
)  # fmt: skip
def test_bad_bodies_get_a_4xx_naming_the_problem(content_type, body, status, message):
    got_status, detail = status_and_detail(content_type, body)
    assert got_status == status and message in detail and "files" in detail


def test_bodies_of_many_tiny_parts_are_refused_after_max_parts():
    part = b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n'
    assert uploaded_files("multipart/form-data; boundary=b", part * 3 + _one_file(), 8)[0] == ["a.png"]
    status, detail = status_and_detail("multipart/form-data; boundary=b", part * (MAX_PARTS + 1) + _one_file())
    assert status == 413 and f"more than {MAX_PARTS} parts" in detail


def _one_file() -> bytes:
    return b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\nPNG\r\n--b--\r\n'
