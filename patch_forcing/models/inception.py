"""Inception-v3, FID variant (TF graph `inception-2015-12-05`), in flax NNX: the network behind
FID/sFID/IS in the ADM evaluation suite and pytorch-fid.

Blocks mirror pytorch-fid's port and parameter names its state-dict keys (`Mixed_5b.branch1x1.
conv.kernel`, ...). What a reader must know: `features_fn` reproduces ADM's three outputs exactly
(pool, the 7-channel mixed_6/conv spatial features for sFID, and the bias-free logits for IS; see
its docstring), and weights are read from pytorch-fid's .pth with torch, never downloaded
implicitly (`load_inception`, `download_inception_weights`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from patch_forcing import paths

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "PF_INCEPTION_WEIGHTS"
NETWORK_NAME = "inception-2015-12-05"
PREPROCESS_MODES = ("adm", "pytorch_fid")
SPATIAL_CHANNELS = 7
INPUT_SIZE = 299
_BN_EPS = 1e-3


def network_name(preprocess: str = "adm") -> str:
    """Name recorded next to every metric: which network and pre-processing produced it."""
    _check_preprocess(preprocess)
    return f"{NETWORK_NAME}/{preprocess}"


def _check_preprocess(preprocess):
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"preprocess={preprocess!r} is not one of {list(PREPROCESS_MODES)}")


# ----------------------------------------------------------------------------- resize

def _resize_indices(n_in: int, n_out: int, mode: str):
    """Per output index: (lo, hi, frac) source taps of 1-D bilinear resampling (float32 maths)."""
    dst = np.arange(n_out, dtype=np.float32)
    scale = np.float32(n_in / n_out)
    if mode == "adm":  # TF1 legacy: src = dst * in / out
        src = dst * scale
    else:  # torch align_corners=False: src = (dst + 0.5) * in / out - 0.5, clamped at 0; torch's
        # CPU kernel fuses this multiply-add (one rounding), which float64 maths reproduces.
        src = ((dst + 0.5) * np.float64(scale) - 0.5).astype(np.float32)
        src = np.maximum(src, np.float32(0))
    lo = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo.astype(np.float32)).astype(np.float32)
    return lo, hi, frac


def _resize_axis(x, axis: int, n_out: int, mode: str):
    lo, hi, frac = _resize_indices(x.shape[axis], n_out, mode)
    a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
    shape = [1] * x.ndim
    shape[axis] = n_out
    f = jnp.asarray(frac).reshape(shape)
    if mode == "adm":  # TF: a + (b - a) * f
        return a + (b - a) * f
    return a * (1 - f) + b * f  # torch: w0 * a + w1 * b


def resize_bilinear(x, size: int = INPUT_SIZE, mode: str = "adm"):
    """Bilinear resize (no antialias) of x (B, H, W, C) float -> (B, size, size, C).

    Width first, then height, as both TF1 and torch's CPU kernel do.
    """
    _check_preprocess(mode)
    return _resize_axis(_resize_axis(x, 2, size, mode), 1, size, mode)


def preprocess_images(images, mode: str = "adm"):
    """uint8 or [0, 255] float images (B, H, W, 3) -> (B, 299, 299, 3) float32 in [-1, 1].

    Both modes resize bilinearly without antialiasing. 'adm': TF1 ResizeBilinear (align_corners
    False, no half-pixel centres) on [0, 255], then (x - 128) / 128, the graph that made ADM's
    reference statistics. 'pytorch_fid': x / 255, F.interpolate(bilinear, align_corners=False),
    then 2x - 1."""
    _check_preprocess(mode)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images.shape={images.shape} is not (B, H, W, 3)")
    x = jnp.asarray(images).astype(jnp.float32)
    if mode == "adm":
        return (resize_bilinear(x, INPUT_SIZE, mode) - 128.0) / 128.0
    return 2.0 * resize_bilinear(x / 255.0, INPUT_SIZE, mode) - 1.0


# ----------------------------------------------------------------------------- layers

def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


_he_normal = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


class BasicConv2d(nnx.Module):
    """conv (no bias) -> BatchNorm (inference, eps 1e-3) -> ReLU; BN folded into the conv."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0, *, rngs, dtype=jnp.float32):
        kernel_size, (ph, pw) = _pair(kernel_size), _pair(padding)
        self.conv = nnx.Conv(cin, cout, kernel_size, use_bias=False, kernel_init=_he_normal,
                             rngs=rngs)
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=_BN_EPS, rngs=rngs)
        self.stride = _pair(stride)
        self.padding = ((ph, ph), (pw, pw))
        self.dtype = dtype

    def __call__(self, x):  # (B, H, W, Cin) -> (B, H', W', Cout)
        bn = self.bn
        inv = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + _BN_EPS)
        kernel = (self.conv.kernel[...] * inv).astype(self.dtype)
        shift = (bn.bias[...] - bn.mean[...] * inv).astype(self.dtype)
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), kernel, self.stride, self.padding,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(y + shift)


def _max_pool(x, stride, pad):
    pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                                 pads)


def _avg_pool_same(x):
    """3x3 / stride 1 / pad 1 average that ignores the padding (TF's SAME average pool)."""
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    return total / count


class InceptionA(nnx.Module):  # Mixed_5b/c/d, 35x35
    def __init__(self, cin, pool_features, *, rngs, dtype):
        kw = dict(rngs=rngs, dtype=dtype)
        self.branch1x1 = BasicConv2d(cin, 64, 1, **kw)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, **kw)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **kw)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, **kw)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, cin, *, rngs, dtype):
        kw = dict(rngs=rngs, dtype=dtype)
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **kw)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, _max_pool(x, 2, 0)], axis=-1)


class InceptionC(nnx.Module):  # Mixed_6b..6e, 17x17
    def __init__(self, cin, c7, *, rngs, dtype):
        kw = dict(rngs=rngs, dtype=dtype)
        row = dict(kernel_size=(1, 7), padding=(0, 3))
        col = dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, 1, **kw)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, **kw)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row, **kw)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col, **kw)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, **kw)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col, **kw)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row, **kw)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col, **kw)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row, **kw)
        self.branch_pool = BasicConv2d(cin, 192, 1, **kw)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, cin, *, rngs, dtype):
        kw = dict(rngs=rngs, dtype=dtype)
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, **kw)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, **kw)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, **kw)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **kw)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **kw)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, **kw)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 2, 0)], axis=-1)


class InceptionE(nnx.Module):  # Mixed_7b (avg pool branch), Mixed_7c (max pool branch), 8x8
    def __init__(self, cin, pool: str, *, rngs, dtype):
        kw = dict(rngs=rngs, dtype=dtype)
        row = dict(kernel_size=(1, 3), padding=(0, 1))
        col = dict(kernel_size=(3, 1), padding=(1, 0))
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1, **kw)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, **kw)
        self.branch3x3_2a = BasicConv2d(384, 384, **row, **kw)
        self.branch3x3_2b = BasicConv2d(384, 384, **col, **kw)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, **kw)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **kw)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row, **kw)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col, **kw)
        self.branch_pool = BasicConv2d(cin, 192, 1, **kw)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        pooled = _max_pool(x, 1, 1) if self.pool == "max" else _avg_pool_same(x)
        return jnp.concatenate([b1, b3, bd, self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
    """FID Inception-v3: __call__(images uint8 or [0, 255] float (B, H, W, 3), preprocess)
    -> dict(pool, spatial, logits)."""

    def __init__(self, *, rngs: nnx.Rngs = None, dtype=jnp.float32):
        rngs = nnx.Rngs(0) if rngs is None else rngs
        kw = dict(rngs=rngs, dtype=dtype)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, "avg", **kw)
        self.Mixed_7c = InceptionE(2048, "max", **kw)
        self.fc = nnx.Linear(2048, 1008, rngs=rngs)

    def __call__(self, images, preprocess: str = "adm"):
        x = preprocess_images(images, preprocess)  # (B, 299, 299, 3)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool(x, 2, 0)
        x = _max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 2, 0)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c):
            x = block(x)
        # mixed_6/conv:0 (XLA's CSE merges this with the same conv inside Mixed_6d).
        spatial = self.Mixed_6d.branch1x1(x)[..., :SPATIAL_CHANNELS]  # (B, 17, 17, 7)
        for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # (B, 2048)
        logits = pool @ self.fc.kernel[...]  # (B, 1008), no bias (as ADM's IS)
        return dict(pool=pool, spatial=spatial.reshape(spatial.shape[0], -1).astype(jnp.float32),
                    logits=logits)


# ----------------------------------------------------------------------------- params

@functools.lru_cache(maxsize=None)
def _structure(dtype=jnp.float32):
    """(graphdef, abstract state) of the model; built once (tracing all initialisers is slow)."""
    return nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), dtype=dtype)))


def _param_shapes() -> dict:
    """Flat param path (tuple) -> shape."""
    return {path: v.shape for path, v in nnx.to_flat_state(_structure()[1])}


def _nest(flat: dict) -> dict:
    out = {}
    for path, v in flat.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return out


def init_params(seed: int = 0) -> dict:
    """Random parameters (pure dict; He-normal convs, identity BN, N(0, 1/2048) fc), drawn with
    numpy so that no initialiser needs compiling; for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in _param_shapes().items():
        if path[-1] == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            std = np.sqrt((1.0 if path[0] == "fc" else 2.0) / fan_in)
            flat[path] = (rng.standard_normal(shape) * std).astype(np.float32)
        else:  # BN scale/var -> 1, BN bias/mean and fc bias -> 0
            fill = 1.0 if path[-1] in ("scale", "var") else 0.0
            flat[path] = np.full(shape, fill, np.float32)
    return _nest(flat)


@functools.partial(jax.jit, static_argnames=("preprocess", "dtype"))
def features_fn(params: dict, images, preprocess: str = "adm", dtype=jnp.float32) -> dict:
    """Inception features of images uint8 (B, H, W, 3), float32, `params` from `load_inception`:
      pool    (B, 2048)     `pool_3:0`, the FID features.
      spatial (B, 7*17*17)  `mixed_6/conv:0` = Mixed_6d.branch1x1 after BN+ReLU, first 7 channels,
                            flattened (h, w, c) as ADM's evaluator does, so its mu_s/sigma_s apply.
      logits  (B, 1008)     pool @ fc.kernel WITHOUT the bias: ADM's IS soft-maxes the graph's
                            `softmax/logits/MatMul` (torch-fidelity's `logits_unbiased`)."""
    graphdef, abstract = _structure(dtype)
    state = jax.tree.map(lambda x: x, abstract)  # fresh Variables; the cached ones stay abstract
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)(images, preprocess)


def _torch_key_map() -> dict:
    """Our flat param path (tuple) -> pytorch-fid state-dict key."""
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
            "var": "running_var"}
    return {path: ".".join(map(str, path[:-1] + (leaf[path[-1]],))) for path in _param_shapes()}


def convert_pytorch_fid_weights(state_dict) -> dict:
    """pytorch-fid state dict (`pt_inception-2015-12-05-6726825d.pth`) -> params (pure dict).

    Conv OIHW -> HWIO, fc (1008, 2048) -> (2048, 1008). Every key must map; `num_batches_tracked`
    buffers are ignored. Raises ValueError listing missing/unexpected keys or bad shapes.
    """
    shapes = _param_shapes()
    key_map = _torch_key_map()
    given = {k for k in state_dict if not k.endswith("num_batches_tracked")}
    missing = sorted(set(key_map.values()) - given)
    unexpected = sorted(given - set(key_map.values()))
    if missing or unexpected:
        raise ValueError(f"state_dict does not match pytorch-fid's Inception: missing keys "
                         f"{missing}, unexpected keys {unexpected}")
    flat = {}
    for path, key in key_map.items():
        v = state_dict[key]
        v = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
        if path[-1] == "kernel":
            # conv OIHW -> HWIO; fc (out, in) -> (in, out)
            v = v.transpose(2, 3, 1, 0) if v.ndim == 4 else v.T
        if v.shape != shapes[path]:
            raise ValueError(f"state_dict[{key!r}] has shape {v.shape} after conversion, "
                             f"expected {shapes[path]}")
        flat[path] = v
    return _nest(flat)


def default_weights_path() -> str:
    """$PF_INCEPTION_WEIGHTS, else $XDG_CACHE_HOME (or ~/.cache)/patch_forcing/<file>."""
    if os.environ.get(WEIGHTS_ENV):
        return os.environ[WEIGHTS_ENV]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "patch_forcing", WEIGHTS_FILENAME)


def load_inception(path: str | None = None) -> dict:
    """Params of the FID Inception from pytorch-fid's .pth (argument, $PF_INCEPTION_WEIGHTS, or
    the cache path). Never downloads; raises FileNotFoundError naming the URL and the path."""
    path = str(path or default_weights_path())
    if not paths.path(path).is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {path!r}; download {FID_WEIGHTS_URL} to that path "
            f"(or call patch_forcing.models.inception.download_inception_weights(), needs network), or "
            f"set ${WEIGHTS_ENV} to the file")
    import torch  # optional: only to read the .pth

    with paths.path(path).open("rb") as f:  # local or gs://
        state_dict = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    return convert_pytorch_fid_weights(state_dict)


def download_inception_weights(path: str | None = None) -> str:
    """Download pytorch-fid's weights (~92 MB; NEEDS NETWORK) to `path` (default cache path),
    checking the sha256 prefix in the file name. Returns the path."""
    path = path or default_weights_path()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    print(f"downloading {FID_WEIGHTS_URL} -> {path} (needs network access)")
    tmp = path + ".part"
    urllib.request.urlretrieve(FID_WEIGHTS_URL, tmp)
    with open(tmp, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    expected = WEIGHTS_FILENAME.rsplit("-", 1)[1].split(".")[0]
    if not digest.startswith(expected):
        os.remove(tmp)
        raise ValueError(f"downloaded file sha256={digest[:8]}..., expected prefix {expected}")
    os.replace(tmp, path)
    return path
