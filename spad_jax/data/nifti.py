"""Minimal reader of 2D NIfTI-1 files (``.nii``, ``.nii.gz``), numpy only.

Enough for single-slice images and label maps in the folder format: the
348-byte NIfTI-1 header, either byte order, the common voxel types and the
``scl_slope``/``scl_inter`` scaling. Arrays come back as ``[rows, columns]``
with rows along the file's second axis (``j``) and columns along its first
(``i``), i.e. the transpose of the on-disk ``[i, j]`` order, the way 2D
slices are usually displayed. Orientation matrices are not applied.
"""

import gzip
import struct

import numpy as np

_TYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32,
          64: np.float64, 256: np.int8, 512: np.uint16, 768: np.uint32}


class NiftiError(ValueError):
  """A file that is not a readable 2D NIfTI-1 image (message says why)."""


def read(path: str) -> np.ndarray:
  """The 2D array stored in ``path`` (scaled when ``scl_slope`` is set)."""
  try:
    opener = gzip.open if path.lower().endswith('.gz') else open
    with opener(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise NiftiError(f'unreadable ({e})') from e
  if len(data) < 348:
    raise NiftiError(f'{len(data)} bytes, shorter than a NIfTI-1 header')
  for endian in '<>':
    if struct.unpack(endian + 'i', data[:4])[0] == 348:
      break
  else:
    if struct.unpack('<i', data[:4])[0] == 540:
      raise NiftiError('NIfTI-2 is not supported; save as NIfTI-1')
    raise NiftiError('not a NIfTI-1 file (header size is not 348)')
  if data[344:347] not in (b'n+1', b'ni1'):
    raise NiftiError(f'bad magic {data[344:348]!r}')
  if data[344:347] == b'ni1':
    raise NiftiError('a .hdr/.img pair; save as a single .nii file')
  dim = struct.unpack(endian + '8h', data[40:56])
  code = struct.unpack(endian + 'h', data[70:72])[0]
  vox_offset = int(struct.unpack(endian + 'f', data[108:112])[0])
  slope, inter = struct.unpack(endian + '2f', data[112:120])
  ndim = dim[0]
  if not 2 <= ndim <= 7 or any(d != 1 for d in dim[3:ndim + 1]):
    raise NiftiError(f'shape {dim[1:ndim + 1]} is not 2D (one slice)')
  if code not in _TYPES:
    raise NiftiError(f'unsupported voxel type code {code}')
  dtype = np.dtype(_TYPES[code]).newbyteorder(endian)
  nx, ny = dim[1], dim[2]
  if nx < 1 or ny < 1:
    raise NiftiError(f'bad size {nx}x{ny}')
  need = vox_offset + nx * ny * dtype.itemsize
  if len(data) < need:
    raise NiftiError(f'truncated: {len(data)} bytes, {need} needed')
  flat = np.frombuffer(data, dtype, nx * ny, vox_offset)
  array = flat.reshape(ny, nx).astype(dtype.newbyteorder('='))  # j rows, i cols.
  if slope not in (0.0, 1.0) or inter != 0.0:
    array = array.astype(np.float64) * (slope or 1.0) + inter
  return array


def write(path: str, array: np.ndarray) -> None:
  """Writes a 2D array ``[rows, columns]`` as NIfTI-1 (tests, converters)."""
  array = np.asarray(array)
  code = {np.dtype(t): c for c, t in _TYPES.items()}[array.dtype]
  header = bytearray(352)
  struct.pack_into('<i', header, 0, 348)
  struct.pack_into('<8h', header, 40, 2, array.shape[1], array.shape[0], 1,
                   1, 1, 1, 1)
  struct.pack_into('<2h', header, 70, code, array.dtype.itemsize * 8)
  struct.pack_into('<8f', header, 76, 1, 1, 1, 1, 1, 1, 1, 1)
  struct.pack_into('<3f', header, 108, 352.0, 1.0, 0.0)
  header[344:348] = b'n+1\0'
  payload = bytes(header) + np.ascontiguousarray(
      array.astype(array.dtype.newbyteorder('<'))).tobytes()
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'wb') as f:
    f.write(payload)
