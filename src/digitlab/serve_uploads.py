"""The files of a multipart/form-data request body, read by python-multipart (the parser Starlette uses)
straight into bytes: no temporary file and no form object per upload, a one-file body in 24 µs instead of
Starlette's 42 (benchmarks/README.md)."""

from __future__ import annotations

import codecs

from fastapi import HTTPException
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

FILES_FIELD = b"files"
MAX_PARTS = 1000
"""Parts one body may hold, files and other fields together (as Starlette's form parser allows)."""
RESEND = 'send the images as multipart/form-data files in the field "files"'


def uploaded_files(content_type: str, body: bytes, max_images: int) -> tuple[list[str], list[bytes]]:
    """The names and contents of the files in the `files` field of a multipart/form-data body.

    400 for a malformed body, 413 beyond `max_images` files (or `MAX_PARTS`
    parts), 422 when there is no file or a `files` part is a text field. Other
    fields are skipped. A file without a name is called files[i].
    """
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary:
        raise HTTPException(400, f"the multipart/form-data Content-Type has no boundary; {RESEND}")
    reader = PartReader(charset_of(options), max_images)
    try:
        parser = MultipartParser(boundary, reader.callbacks())
        parser.write(body)
        parser.finalize()
    except FormParserError as error:
        raise HTTPException(400, f"malformed multipart/form-data body ({error}); {RESEND}") from None
    if not reader.files:
        raise HTTPException(422, f"no images: {RESEND}")
    if len(reader.files) > max_images:
        raise HTTPException(413, f"{len(reader.files)} images in one request; send at most {max_images}")
    names = []
    for index, (name, _) in enumerate(reader.files):
        if name is None:
            raise HTTPException(422, f'files[{index}] is a text field; send image files in "files"')
        names.append(name or f"files[{index}]")
    return names, [data for _, data in reader.files]


def charset_of(options: dict[bytes, bytes]) -> str:
    """The codec a body's field and file names are in: the Content-Type's charset, else UTF-8."""
    try:
        return codecs.lookup(options.get(b"charset", b"utf-8").decode("latin-1")).name
    except LookupError:
        return "latin-1"


class PartReader:
    """python-multipart's callbacks: each part's Content-Disposition, and the bytes of the `files` field's parts.

    `files` holds (file name, or None for a text field; contents) in order; the
    contents of files beyond the first `max_images` are not kept, only counted.
    """

    def __init__(self, charset: str, max_images: int) -> None:
        self.charset = charset
        self.max_images = max_images
        self.files: list[tuple[str | None, bytes]] = []
        self.parts = 0
        self.header_name = bytearray()
        self.header_value = bytearray()
        self.disposition = b""
        self.in_files_field = False
        self.filename: str | None = None
        self.data = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise HTTPException(413, f"more than {MAX_PARTS} parts in one multipart body; {RESEND}")
        self.disposition, self.in_files_field, self.data = b"", False, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.header_name.lower() == b"content-disposition":
            self.disposition = bytes(self.header_value)
        self.header_name, self.header_value = bytearray(), bytearray()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.disposition)
        if b"name" not in options:
            raise HTTPException(400, f"a multipart part has no field name in its Content-Disposition; {RESEND}")
        self.in_files_field = options[b"name"] == FILES_FIELD
        self.filename = self.decode(options[b"filename"]) if b"filename" in options else None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_files_field and len(self.files) < self.max_images:
            self.data += data[start:end]

    def on_part_end(self) -> None:
        if self.in_files_field:
            self.files.append((self.filename, bytes(self.data)))

    def decode(self, name: bytes) -> str:
        try:
            return name.decode(self.charset)
        except UnicodeDecodeError:
            return name.decode("latin-1")
