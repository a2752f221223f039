import numpy as np
import pytest
from PIL import Image

from koa_ray.data.decode import DecodeError, decode_bytes, read_image


def ramp(h=64, w=80, dtype=np.uint8, maxval=255):
    x = np.linspace(0, maxval, w, dtype=np.float64)[None, :].repeat(h, 0)
    return x.astype(dtype)


def write_dicom(path, arr, photometric="MONOCHROME2", window=None, rescale=None, pixel_data=True):
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if pixel_data:
        ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


@pytest.mark.parametrize("fmt,mode", [("PNG", "L"), ("JPEG", "L"), ("BMP", "L"), ("TIFF", "L"), ("PNG", "RGB"),
                                      ("PNG", "RGBA"), ("JPEG", "RGB")])
def test_8bit_formats(tmp_path, fmt, mode):
    arr = ramp()
    img = Image.fromarray(arr).convert(mode)
    path = tmp_path / f"x.{fmt.lower()}"
    img.save(path, format=fmt)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == arr.shape
    tol = 6 if fmt == "JPEG" else 1
    assert np.abs(out.astype(int) - arr.astype(int)).max() <= tol


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_rescaled(tmp_path, fmt):
    arr = ramp(dtype=np.uint16, maxval=4000)  # 12-bit data in 16-bit container
    path = tmp_path / f"x16.{fmt.lower()}"
    Image.fromarray(arr).save(path, format=fmt)
    out = read_image(path)
    assert out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255  # full dynamic range used, not truncated to the low byte
    assert np.all(np.diff(out[0].astype(int)) >= 0)  # monotone ramp preserved


def test_dicom_monochrome1_16bit_inverted_with_window(tmp_path):
    arr = ramp(dtype=np.uint16, maxval=4095)
    p = tmp_path / "knee.dcm"
    write_dicom(p, arr, photometric="MONOCHROME1", window=(2048, 4096))
    out = read_image(p)
    assert out.dtype == np.uint8 and out.shape == arr.shape
    # MONOCHROME1: high stored values are dark → after inversion the ramp must decrease left to right
    assert out[0, 0] > 200 and out[0, -1] < 50
    mono2 = tmp_path / "knee2.dcm"
    write_dicom(mono2, arr, photometric="MONOCHROME2")
    out2 = read_image(mono2)
    assert out2[0, 0] < 50 and out2[0, -1] > 200


def test_dicom_window_narrows_range(tmp_path):
    arr = ramp(dtype=np.uint16, maxval=4095)
    p = tmp_path / "w.dcm"
    write_dicom(p, arr, window=(1000, 200))  # narrow window: most pixels saturate
    out = read_image(p)
    assert (out == 255).mean() > 0.6 and (out == 0).mean() > 0.15


def test_dicom_without_extension_detected_by_magic(tmp_path):
    p = tmp_path / "IM0001"
    write_dicom(p, ramp(dtype=np.uint16, maxval=1000))
    assert read_image(p).shape == (64, 80)


def test_bad_inputs_have_reasons(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all")
    good = tmp_path / "good.png"
    Image.fromarray(ramp()).save(good)
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:60])
    small = tmp_path / "small.png"
    Image.fromarray(ramp(16, 16)).save(small)
    nopix = tmp_path / "nopix.dcm"
    write_dicom(nopix, ramp(dtype=np.uint16), pixel_data=False)
    expected = {empty: "empty", text: "not an image", truncated: "truncated", small: "too small",
                nopix: "unsupported DICOM", tmp_path / "missing.png": "unreadable path"}
    for path, reason in expected.items():
        with pytest.raises(DecodeError) as e:
            read_image(path)
        assert reason in e.value.reason, (path, e.value.reason)
        assert str(path) in str(e.value)


def test_decode_bytes_min_side():
    import io

    buf = io.BytesIO()
    Image.fromarray(ramp(40, 40)).save(buf, format="PNG")
    assert decode_bytes(buf.getvalue(), min_side=32).shape == (40, 40)
    with pytest.raises(DecodeError):
        decode_bytes(buf.getvalue(), min_side=48)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` pixels and that carries no pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_hostile_sizes_are_per_file_errors(tmp_path):
    """A decompression-bomb header (30000 x 30000) and a 2 GB (sparse) file become DecodeErrors that name the
    file, before anything large is decoded or read."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(30000, 30000))
    with pytest.raises(DecodeError, match="bomb.png: image too large"):
        read_image(bomb)
    huge = tmp_path / "huge.png"
    with open(huge, "wb") as f:
        f.truncate(2 * 1024**3)  # sparse: no disk used, and never read
    with pytest.raises(DecodeError, match=r"huge.png: file too large \(2147483648 bytes"):
        read_image(huge)


def test_16bit_outlier_pixels_do_not_crush_contrast(tmp_path):
    """A 16-bit image whose values span 14k-26k, with one hot (65535) and one dead (0) pixel, is windowed on its
    robust range: the anatomy keeps its contrast (min-max scaling would squeeze it into ~50 grey levels)."""
    rng = np.random.default_rng(0)
    a = rng.normal(20000, 2000, (128, 128)).clip(14000, 26000).astype(np.uint16)
    a[5, 5], a[6, 6] = 65535, 0
    Image.fromarray(a).save(tmp_path / "x.tif")
    out = read_image(tmp_path / "x.tif")
    rest = np.ones(a.shape, bool)
    rest[5, 5] = rest[6, 6] = False
    assert out[rest].max() - out[rest].min() > 200  # min-max would give ~47
    assert out[5, 5] == 255 and out[6, 6] == 0
    assert np.corrcoef(out[rest].astype(float), a[rest].astype(float))[0, 1] > 0.99  # order kept


def test_compressed_dicom_transfer_syntaxes(tmp_path):
    """RLE Lossless (pydicom's own decoder) decodes to the same image as uncompressed; JPEG 2000 and JPEG-LS, whose
    decoders (pylibjpeg-openjpeg, pyjpegls) are not installed, give a per-file error naming the transfer syntax."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    arr = ramp(64, 80, np.uint16, 4000)
    write_dicom(tmp_path / "plain.dcm", arr)
    ds = pydicom.dcmread(tmp_path / "plain.dcm")
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    assert pydicom.dcmread(tmp_path / "rle.dcm").file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(read_image(tmp_path / "rle.dcm"), read_image(tmp_path / "plain.dcm"))
    for uid in (JPEG2000Lossless, JPEGLSLossless):
        ds = pydicom.dcmread(tmp_path / "plain.dcm")
        ds.file_meta.TransferSyntaxUID = uid
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])  # a codestream the decoder would need
        ds["PixelData"].VR = "OB"
        ds.save_as(tmp_path / "c.dcm", enforce_file_format=True)
        with pytest.raises(DecodeError, match=rf"c.dcm: unsupported DICOM pixel data \(transfer syntax {uid}"):
            read_image(tmp_path / "c.dcm")
