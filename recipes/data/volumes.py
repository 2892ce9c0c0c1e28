"""Reading and writing medical volumes: NIfTI (nibabel), DICOM series (pydicom) and stacks of 16-bit
PNG/TIFF slices, as one `Volume`: the voxels in a canonical orientation, their spacing in mm and what it
takes to put a result back into the file's own frame.

Canonical orientation is nibabel's closest RAS+ (as `as_closest_canonical`): axes permuted and flipped
so that voxel axes 0, 1 and 2 increase along +x, +y and +z of the RAS mm frame (towards the
patient's left, anterior and superior); slices are taken along axis 2. `Volume.to_original` undoes the
permutation and the flips, so a label map computed in the canonical frame is written with the input's
exact shape, affine and header (`save_like`).

Example:
    >>> import numpy as np, tempfile, os, nibabel as nib
    >>> path = os.path.join(tempfile.mkdtemp(), "scan.nii.gz")
    >>> affine = np.diag([-0.8, 0.8, 3.0, 1.0])       # x flipped: stored left to right
    >>> nib.save(nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), affine), path)
    >>> vol = read_volume(path)
    >>> back = vol.to_original(vol.data)
    >>> vol.spacing, bool(vol.data[0, 0, 0] == 12), back.tolist() == np.arange(24).reshape(2, 3, 4).tolist()
    ((0.8, 0.8, 3.0), True, True)
"""
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import UserError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SLICE_SUFFIXES = (".png", ".tif", ".tiff")


class VolumeError(UserError):
    """A volume (or a volume/label pair) that cannot be used as it is; the message names the fix."""


def is_nifti(path: Union[str, os.PathLike]) -> bool:
    """Whether `path` names a NIfTI file by its suffix.

    Example:
        >>> is_nifti("ct_0000.nii.gz"), is_nifti("photo.png")
        (True, False)
    """
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def is_dicom_dir(path: Union[str, os.PathLike]) -> bool:
    """Whether `path` is a folder holding DICOM files (`.dcm`, or files with the `DICM` preamble).

    Example:
        >>> import tempfile
        >>> is_dicom_dir(tempfile.mkdtemp())
        False
    """
    p = Path(path)
    if not p.is_dir():
        return False
    for f in sorted(p.iterdir())[:64]:
        if f.is_file() and (f.suffix.lower() == ".dcm" or _has_dicm_preamble(f)):
            return True
    return False


def is_volume_input(path: Union[str, os.PathLike]) -> bool:
    """A NIfTI file or a DICOM folder (what `samadapt predict` hands to volume inference).

    Example:
        >>> is_volume_input("scan.nii.gz"), is_volume_input("photo.jpg")
        (True, False)
    """
    return is_nifti(path) or is_dicom_dir(path)


def _has_dicm_preamble(f: Path) -> bool:
    try:
        with open(f, "rb") as fh:
            head = fh.read(132)
        return len(head) == 132 and head[128:] == b"DICM"
    except OSError:
        return False


def volume_stem(path: Union[str, os.PathLike]) -> str:
    """The file name without `.nii`/`.nii.gz` (a folder's own name for DICOM).

    Example:
        >>> volume_stem("a/liver_003_0000.nii.gz")
        'liver_003_0000'
    """
    name = Path(path).name
    for s in (".nii.gz", ".nii"):
        if name.lower().endswith(s):
            return name[: -len(s)]
    return name


@dataclass
class Volume:
    """A 3-D volume in canonical (closest RAS+) orientation.

    Attributes:
        data: X x Y x Z voxels (slices along the last axis), canonical orientation.
        spacing: voxel size in mm per canonical axis.
        affine: the canonical voxel -> patient (RAS) mm matrix.
        source: where it came from.
        original_affine: the file's own affine (for writing results back).
        original_shape: the file's own shape.
        header: the NIfTI header to write results with (None for DICOM and slices: a fresh one).
        transform: nibabel orientation transform from the file's axes to canonical ones.
        meta: anything else known (`modality`, `series_uid`, ...).
    """

    data: np.ndarray
    spacing: Tuple[float, float, float]
    affine: np.ndarray
    source: str = ""
    original_affine: Optional[np.ndarray] = None
    original_shape: Optional[Tuple[int, ...]] = None
    header: Any = None
    transform: Optional[np.ndarray] = None
    meta: Dict[str, Any] = field(default_factory=dict)

    def to_original(self, array: np.ndarray) -> np.ndarray:
        """An array on the canonical grid (e.g. a label map) put back into the file's own axes and flips."""
        import nibabel as nib

        if self.transform is None:
            return array
        ras = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
        back = nib.orientations.ornt_transform(ras, self.transform)
        return np.ascontiguousarray(nib.orientations.apply_orientation(array, back))


def _canonical(data: np.ndarray, affine: np.ndarray, source: str, header=None, meta=None) -> Volume:
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    canon = nib.orientations.apply_orientation(data, ornt)
    new_affine = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    # rounded: NIfTI stores the affine in float32 (0.8 reads back as 0.800000011920929)
    spacing = tuple(round(float(s), 6) for s in np.sqrt((new_affine[:3, :3] ** 2).sum(axis=0)))
    return Volume(np.ascontiguousarray(canon), spacing, new_affine, source, affine.copy(), tuple(data.shape),
                  header, ornt, dict(meta or {}))


def read_nifti(path: Union[str, os.PathLike], mmap: bool = True) -> Volume:
    """Read a 3-D NIfTI file (a 4-D file with one volume is squeezed) into canonical orientation.

    Args:
        path: a `.nii` or `.nii.gz` file.
        mmap: memory-map an uncompressed `.nii` (gzip cannot be mapped: it is decoded once).

    Raises:
        VolumeError: unreadable, or not 3-D (a 4-D series with several volumes names the fix).

    Example:
        >>> import numpy as np, tempfile, os, nibabel as nib
        >>> p = os.path.join(tempfile.mkdtemp(), "x.nii")
        >>> nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4)), p)
        >>> read_nifti(p).data.shape
        (4, 5, 6)
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"{path}: no such NIfTI file")
    try:
        img = nib.load(str(path), mmap=mmap)
        shape = img.shape
    except Exception as e:  # nibabel raises several types for damaged files
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VolumeError(f"{path}: not a readable NIfTI file ({why})") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise VolumeError(f"{path}: a {len(img.shape)}-D image of shape {tuple(img.shape)}; samadapt reads 3-D "
                          "volumes: split the channels or time points into one 3-D file each (nnU-Net's _0000, "
                          "_0001 ...)")
    data = np.asanyarray(img.dataobj).reshape(shape)
    return _canonical(data, img.affine, str(path), header=img.header,
                      meta={"dtype": str(img.get_data_dtype())})


def check_label_array(data: np.ndarray, where: str, allowed: Optional[Sequence[int]] = None) -> np.ndarray:
    """A label map as integers: float files are accepted only when every value is a whole number, and
    values outside `allowed` (dataset.json's labels) are refused.

    Raises:
        VolumeError: fractional values, or values not among the labels.

    Example:
        >>> check_label_array(np.array([0.0, 2.0]), "x", allowed=[0, 1, 2]).dtype
        dtype('int16')
    """
    arr = np.asarray(data)
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            frac = arr[np.isfinite(arr) & (arr != np.round(arr))]
            example = float(frac.flat[0]) if frac.size else float("nan")
            raise VolumeError(f"{where}: a label file must hold whole class numbers, but it holds float values such "
                              f"as {example}; write it as an integer image (e.g. np.rint(x).astype(np.uint8))")
    arr = np.rint(arr).astype(np.int16) if not np.issubdtype(arr.dtype, np.integer) else arr.astype(np.int16)
    if allowed is not None:
        bad = sorted(set(np.unique(arr).tolist()) - {int(a) for a in allowed})
        if bad:
            raise VolumeError(f"{where}: label values {bad[:8]} are not in dataset.json's labels "
                              f"{sorted(int(a) for a in allowed)}; fix the label file or add them to dataset.json")
    return arr


def read_label(path: Union[str, os.PathLike], like: Optional[Volume] = None,
               allowed: Optional[Sequence[int]] = None) -> Volume:
    """Read a label volume and check it against its image: same shape and affine, whole class numbers.

    Args:
        path: a NIfTI label file.
        like: the image it labels (shape and affine must match).
        allowed: the label values dataset.json declares.

    Raises:
        VolumeError: shape or affine differ from the image's, float values, or undeclared labels.
    """
    lab = read_nifti(path)
    if like is not None:
        if lab.original_shape != like.original_shape:
            raise VolumeError(f"{path}: label shape {lab.original_shape} differs from its image's "
                              f"{like.original_shape} ({like.source}); pair each image with its own label file")
        if not np.allclose(lab.original_affine, like.original_affine, atol=1e-3):
            raise VolumeError(f"{path}: label affine differs from its image's ({like.source}); the label was saved in "
                              "another frame: resample it onto the image (or copy the image's affine if only the "
                              "header is wrong)")
    lab.data = check_label_array(lab.data, str(path), allowed)
    return lab


# ---------------------------------------------------------------------------- DICOM
def _dicom_files(folder: Path) -> List[Path]:
    return [f for f in sorted(folder.iterdir())
            if f.is_file() and (f.suffix.lower() == ".dcm" or _has_dicm_preamble(f))]


def list_dicom_series(folder: Union[str, os.PathLike]) -> Dict[str, List[Path]]:
    """The DICOM files of a folder grouped by SeriesInstanceUID.

    Example:
        >>> import tempfile
        >>> list_dicom_series(tempfile.mkdtemp())
        {}
    """
    import pydicom

    out: Dict[str, List[Path]] = {}
    for f in _dicom_files(Path(folder)):
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:
            continue  # not a DICOM file after all (a DICOMDIR, a stray file): the series check below names it
        out.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append(f)
    return out


def read_dicom_series(folder: Union[str, os.PathLike], series_uid: Optional[str] = None) -> Volume:
    """Read one DICOM series: slices sorted by their position along the slice normal (not by file name),
    RescaleSlope/Intercept applied (CT in HU), geometry from ImagePositionPatient/ImageOrientationPatient.

    Args:
        folder: a folder of DICOM files.
        series_uid: which series, when the folder holds several.

    Raises:
        VolumeError: no DICOM files, several series and no `series_uid` (they are listed), slices of
            different sizes or orientations, or repeated positions.

    Example (see tests/test_volumes.py for a synthetic series):
        vol = read_dicom_series("CT_folder/")
    """
    import pydicom

    folder = Path(folder)
    series = list_dicom_series(folder)
    if not series:
        raise VolumeError(f"{folder}: no DICOM files found (.dcm or files starting with the DICM preamble)")
    if series_uid is None and len(series) > 1:
        listed = ", ".join(f"{uid} ({len(fs)} files)" for uid, fs in sorted(series.items()))
        raise VolumeError(f"{folder}: holds {len(series)} DICOM series ({listed}); put each series in its own folder")
    uid = series_uid if series_uid is not None else next(iter(series))
    if uid not in series:
        raise VolumeError(f"{folder}: no series {uid!r}; it holds {sorted(series)}")
    slices = [pydicom.dcmread(str(f)) for f in series[uid]]
    try:
        iop = np.array([float(v) for v in slices[0].ImageOrientationPatient])
        row, col = iop[:3], iop[3:]
        normal = np.cross(row, col)
        for s in slices:
            if not np.allclose([float(v) for v in s.ImageOrientationPatient], iop, atol=1e-4):
                raise VolumeError(f"{folder}: slices of series {uid} have different orientations; not one volume")
        pos = [np.array([float(v) for v in s.ImagePositionPatient]) for s in slices]
    except AttributeError as e:
        raise VolumeError(f"{folder}: a slice lacks {str(e).split()[-1]} (ImagePositionPatient and "
                          "ImageOrientationPatient are needed to stack slices)") from None
    order = np.argsort([float(p @ normal) for p in pos])
    slices = [slices[i] for i in order]
    pos = [pos[i] for i in order]
    shapes = {(int(s.Rows), int(s.Columns)) for s in slices}
    if len(shapes) > 1:
        raise VolumeError(f"{folder}: slices of series {uid} have different sizes {sorted(shapes)}")
    dist = np.diff([float(p @ normal) for p in pos])
    if len(slices) > 1 and np.any(np.abs(dist) < 1e-6):
        raise VolumeError(f"{folder}: series {uid} repeats a slice position; remove the duplicate files")
    dz = float(np.median(dist)) if len(slices) > 1 else float(getattr(slices[0], "SliceThickness", 1.0) or 1.0)
    planes = []
    for s in slices:
        px = s.pixel_array.astype(np.float32)
        slope = float(getattr(s, "RescaleSlope", 1) or 1)
        inter = float(getattr(s, "RescaleIntercept", 0) or 0)
        planes.append(px * slope + inter)
    # pixel_array is rows x columns; voxel (i=column, j=row, k=slice) is the DICOM/ITK convention
    data = np.stack(planes, axis=-1).transpose(1, 0, 2)
    dr, dc = (float(v) for v in slices[0].PixelSpacing)  # row spacing (between rows), column spacing
    lps = np.eye(4)
    lps[:3, 0] = row * dc
    lps[:3, 1] = col * dr
    lps[:3, 2] = normal * dz
    lps[:3, 3] = pos[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's patient frame is LPS, NIfTI's RAS
    return _canonical(data, affine, str(folder), meta={"modality": str(getattr(slices[0], "Modality", "")),
                                                       "series_uid": uid})


# ---------------------------------------------------------------------------- 16-bit slices
def read_slice_stack(files: Sequence[Union[str, os.PathLike]], spacing=(1.0, 1.0, 1.0)) -> Volume:
    """Stack 2-D grayscale PNG/TIFF slices (8 or 16 bit, kept at full depth) into a volume, in the order given.

    Example:
        >>> import numpy as np, tempfile, os, cv2
        >>> d = tempfile.mkdtemp(); paths = [os.path.join(d, f"{i}.png") for i in range(2)]
        >>> for i, p in enumerate(paths): _ = cv2.imwrite(p, np.full((3, 4), 40000 + i, np.uint16))
        >>> v = read_slice_stack(paths); v.data.shape, int(v.data.max())
        ((4, 3, 2), 40001)
    """
    import cv2

    planes = []
    for f in files:
        a = cv2.imread(str(f), cv2.IMREAD_UNCHANGED | cv2.IMREAD_ANYDEPTH)
        if a is None:
            raise VolumeError(f"{f}: not a readable image")
        if a.ndim == 3:
            raise VolumeError(f"{f}: a {a.shape[2]}-channel image; slices must be grayscale (8 or 16 bit)")
        planes.append(a)
    if len({p.shape for p in planes}) > 1:
        raise VolumeError(f"slices have different sizes {sorted({p.shape for p in planes})}; not one volume")
    data = np.stack(planes, axis=-1).transpose(1, 0, 2)
    return _canonical(data, np.diag([*map(float, spacing), 1.0]), str(Path(files[0]).parent))


def read_volume(path: Union[str, os.PathLike]) -> Volume:
    """A NIfTI file or a DICOM folder, in canonical orientation.

    Raises:
        VolumeError: neither, or unreadable (see `read_nifti` and `read_dicom_series`).
    """
    if is_nifti(path):
        return read_nifti(path)
    if is_dicom_dir(path):
        return read_dicom_series(path)
    raise VolumeError(f"{path}: not a NIfTI file (.nii, .nii.gz) or a folder of DICOM files")


def save_like(array: np.ndarray, vol: Volume, path: Union[str, os.PathLike], dtype=np.uint8) -> Path:
    """Write an array on `vol`'s canonical grid as NIfTI in the input's own frame: the input's shape, affine
    and (for NIfTI inputs) header; atomically (temporary name, then rename).

    Example:
        >>> import numpy as np, tempfile, os, nibabel as nib
        >>> d = tempfile.mkdtemp(); src = os.path.join(d, "a.nii.gz")
        >>> nib.save(nib.Nifti1Image(np.zeros((3, 4, 5), np.int16), np.diag([-1.0, 1, 2, 1])), src)
        >>> v = read_nifti(src); out = save_like(np.ones(v.data.shape, np.uint8), v, os.path.join(d, "b.nii.gz"))
        >>> nib.load(out).shape, np.allclose(nib.load(out).affine, nib.load(src).affine)
        ((3, 4, 5), True)
    """
    import nibabel as nib

    from samadapt.adapters.io import atomic_file

    out = vol.to_original(np.asarray(array)).astype(dtype)
    affine = vol.original_affine if vol.original_affine is not None else vol.affine
    header = vol.header.copy() if vol.header is not None else None
    img = nib.Nifti1Image(out, affine, header=header)
    img.set_data_dtype(dtype)
    if header is not None:  # the image's scaling would turn class numbers into floats
        img.header.set_slope_inter(1.0, 0.0)
        img.set_qform(affine, code=int(header["qform_code"]) or 1)
        img.set_sform(affine, code=int(header["sform_code"]) or 1)
    path = Path(path)
    suffix = ".nii.gz" if str(path).endswith(".gz") else ".nii"
    with atomic_file(path) as tmp:
        named = tmp + suffix  # nibabel picks compression from the name
        try:
            nib.save(img, named)
            os.replace(named, tmp)
        finally:
            if os.path.exists(named):
                os.remove(named)
    return path
