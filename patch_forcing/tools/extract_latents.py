"""Encode an image dataset into VAE latents (ArrayRecord shards, see `patch_forcing.data.latents`).

    python -m patch_forcing.tools.extract_latents --tfds=imagenet2012 \
        --tfds_manual_dir=/data/imagenet --out=/data/latents/train \
        --vae_path=/ckpt/sd-vae-ft-ema/diffusion_pytorch_model.safetensors
    python -m patch_forcing.tools.extract_latents --images=/data/folder --out=/data/lat
    python -m patch_forcing.tools.extract_latents --images=/data/t2i --out=/data/t2i-lat \
        --vae=flux2 --vae_path=/ckpt/FLUX.2-dev/vae --noflips --image_size=256

Images: `--images` (one subfolder per class; labels are the sorted folder names) or
`--tfds` (with `--tfds_manual_dir` holding ImageNet's tars). Each image is ADM centre-cropped
(`center_crop_arr`) to --image_size, then the VAE encodes it and its horizontal mirror, in
batches jitted over every local device (batch split over a 1-D mesh). `--vae=sd` (default) is
SD's KL-VAE, scaled by its scale factor; `--vae=flux2` the FLUX.2 VAE of the text-to-image model
(32 channels, the posterior mean batch-norm-normalised as the reference's; --mode=mean only).
`--pixels` also stores the cropped uint8 image in its record (+196 KB at 256 px), for REPA's
on-the-fly DINOv2 (`data.with_pixels=True`; the pipeline mirrors it with its latent).

Resumable: shard i holds examples [i*K, (i+1)*K) and is built from its own batches, so a
restarted run skips finished shards, discards a half-written `.tmp` and writes byte-identical
output to an uninterrupted run. `--mode=sample` draws eps from fold_in(seed, index), so it is
deterministic too.

Multi-host (e.g. every host of a TPU pod runs this with --multihost=on): host h encodes the shards
i with i % hosts == h on its own devices and writes them itself; process 0 then lists them all in
metadata.json. The output is the same set of files as from one host. --out may be local or gs://.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import io
import json
import os
import sys
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image
from tqdm import tqdm

from patch_forcing import cluster, paths, sharding
from patch_forcing.data import latents
from patch_forcing.models import flux2_vae
from patch_forcing.models import vae as vae_lib
from patch_forcing.tools import cli

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: halve with BOX while the short side >= 2*size, BICUBIC-resize the
    short side to `size`, then cut the central square. -> uint8 (size, size, 3)."""
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"))
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top: top + image_size, left: left + image_size]


# ----------------------------------------------------------------------------- image sources


class ImageFolder:
    """`root/<class>/**/<image>`: classes sorted by name, files sorted by path within a class."""

    def __init__(self, root: str):
        top = paths.path(root)
        if not top.is_dir():
            raise FileNotFoundError(f"--images={root!r} is not a directory")
        self.classes = sorted(d.name for d in top.iterdir() if d.is_dir())
        self.items: list[tuple[str, int]] = []
        for label, c in enumerate(self.classes):
            files = [str(d / n) for d, _, names in (top / c).walk() for n in names if n.lower().endswith(IMAGE_EXTS)]
            self.items += [(f, label) for f in sorted(files)]
        if not self.items:
            raise ValueError(f"--images={root!r} holds no images in class subfolders (extensions {IMAGE_EXTS})")
        self.description = {"kind": "images", "root": str(root) if paths.is_remote(root) else os.path.abspath(root)}

    def __len__(self) -> int:
        return len(self.items)

    def iter_range(self, start: int, stop: int) -> Iterator[tuple[Any, int]]:
        yield from self.items[start:stop]

    @staticmethod
    def open(raw: str) -> Image.Image:
        with Image.open(io.BytesIO(paths.path(raw).read_bytes())) as im:
            return im.convert("RGB")


class TfdsImages:
    """A tfds split, images left undecoded (JPEG bytes), in the builder's fixed order."""

    def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
                 manual_dir: str | None = None):
        import tensorflow_datasets as tfds  # optional: only for --tfds sources

        self._builder = tfds.builder(name, data_dir=data_dir)
        if not self._builder.is_prepared():  # array_record: random access below
            self._builder.download_and_prepare(
                file_format="array_record", download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        self._split, self._decoders = split, {"image": tfds.decode.SkipDecoding()}
        self._n = self._builder.info.splits[split].num_examples
        self.classes = list(self._builder.info.features["label"].names)
        try:
            self._random_access = self._builder.as_data_source(split, decoders=self._decoders)
        except Exception:  # prepared as tfrecord: fall back to an ordered sequential read
            self._random_access = None
        self.description = {"kind": "tfds", "name": name, "split": split}

    def __len__(self) -> int:
        return self._n

    def iter_range(self, start: int, stop: int) -> Iterator[tuple[Any, int]]:
        if self._random_access is not None:
            for i in range(start, stop):
                r = self._random_access[i]
                yield r["image"], int(r["label"])
            return
        ds = self._builder.as_dataset(self._split, shuffle_files=False, decoders=self._decoders)
        for r in ds.skip(start).take(stop - start).as_numpy_iterator():
            yield r["image"], int(r["label"])

    @staticmethod
    def open(raw: bytes) -> Image.Image:
        with Image.open(io.BytesIO(raw)) as im:
            return im.convert("RGB")


# ----------------------------------------------------------------------------- encoding


def _encode_batch(graphdef, state, x, index, key, mode: str, flips: bool):
    """x uint8 (B, S, S, 3) -> (B, 2, h, w, c') with flips else (B, h, w, c'); c' = 2c for moments."""
    vae = nnx.merge(graphdef, state)
    x = x.astype(jnp.float32) / 127.5 - 1.0
    if flips:  # interleave (image, mirror) per example: each device keeps its own pairs
        x = jnp.stack([x, x[:, :, ::-1]], axis=1).reshape(-1, *x.shape[1:])
    if isinstance(vae, flux2_vae.Flux2AutoencoderKL):  # the normalised posterior mean
        out = vae.encode(x)
        return out.reshape(index.shape[0], 2, *out.shape[1:]) if flips else out
    s = vae.config.scale_factor
    mean, logvar = vae.moments(x)  # (B', h, w, c)
    if mode == "mean":
        out = mean * s
    elif mode == "sample":
        views = 2 if flips else 1
        keys = jax.vmap(lambda i: jax.vmap(lambda v: jax.random.fold_in(jax.random.fold_in(key, i), v))(
            jnp.arange(views)))(index).reshape(-1)
        eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(keys)
        out = (mean + jnp.exp(0.5 * logvar) * eps) * s
    else:  # moments of the scaled latent: N(s * mean, s^2 * var)
        out = jnp.concatenate([mean * s, logvar + 2.0 * np.log(s)], axis=-1)
    return out.reshape(index.shape[0], 2, *out.shape[1:]) if flips else out


@functools.cache
def _jitted():
    """One jit cache across calls, so reruns in one process do not recompile."""
    return jax.jit(_encode_batch, static_argnames=("graphdef", "mode", "flips"))


def _batches(source, start, stop, batch_size, image_size, pool) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Decoded, cropped batches of [start, stop), two batches decoding ahead in `pool`."""
    def load(raw):
        return center_crop_arr(source.open(raw), image_size)

    def submit(lo):
        hi = min(lo + batch_size, stop)
        raws = list(source.iter_range(lo, hi))
        return lo, hi, [pool.submit(load, r) for r, _ in raws], np.array([lab for _, lab in raws], np.int64)

    queue = collections.deque(submit(lo) for lo in range(start, min(start + 2 * batch_size, stop), batch_size))
    nxt = start + len(queue) * batch_size
    while queue:
        lo, hi, futs, labels = queue.popleft()
        if nxt < stop:
            queue.append(submit(nxt))
            nxt += batch_size
        yield np.stack([f.result() for f in futs]), labels, np.arange(lo, hi)


@dataclasses.dataclass(frozen=True)
class Options:
    image_size: int = 256
    shard_size: int = 10_000
    batch_size: int = 64
    mode: str = "mean"
    dtype: str = "float32"
    flips: bool = True
    pixels: bool = False  # also store the cropped uint8 image in each record
    seed: int = 0
    workers: int = 0  # 0: os.cpu_count()
    max_shards: int | None = None  # stop after writing this many shards (partial runs, tests)
    progress: bool = True

    def check(self, num_devices: int) -> None:
        if self.mode not in latents.MODES:
            raise ValueError(f"--mode={self.mode!r} is not one of {list(latents.MODES)}")
        if self.dtype not in latents.DTYPES:
            raise ValueError(f"--dtype={self.dtype!r} is not one of {list(latents.DTYPES)}")
        for name in ("image_size", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 1")
        if self.batch_size % num_devices:
            raise ValueError(f"--batch_size={self.batch_size} must be a multiple of the {num_devices} local devices")


# Checked on resume, the flags first so the error names what the user changed.
_SETTINGS = ("image_size", "mode", "flips", "pixels", "dtype", "seed", "shard_size", "format_version",
             "num_examples", "num_shards", "latent_shape", "record_shape", "scale_factor")
_ABSENT = {"pixels": False}  # metadata written before the setting existed


def _plan(source, vae, vae_name: str, opt: Options) -> dict[str, Any]:
    cfg = vae.config
    f = cfg.downsample_factor
    if opt.image_size % f:
        raise ValueError(f"--image_size={opt.image_size} must be a multiple of the VAE's downsampling factor {f}")
    shape = [opt.image_size // f, opt.image_size // f, cfg.latent_channels]
    rec = shape[:2] + [shape[2] * (2 if opt.mode == "moments" else 1)]
    n = len(source)
    meta = {"format_version": latents.FORMAT_VERSION, "num_examples": n, "num_shards": max(1, -(-n // opt.shard_size)),
            "shard_size": opt.shard_size, "latent_shape": shape, "record_shape": ([2] if opt.flips else []) + rec,
            "dtype": opt.dtype, "scale_factor": getattr(cfg, "scale_factor", 1.0), "flips": opt.flips,
            "pixels": opt.pixels, "mode": opt.mode,
            "seed": opt.seed, "image_size": opt.image_size,
            "vae": {"name": vae_name, "config": dataclasses.asdict(cfg)}, "source": source.description,
            "classes": list(getattr(source, "classes", [])), "shards": []}
    return json.loads(json.dumps(meta))  # JSON types (lists, not tuples), as when read back


def _entry_file(out, name: str):
    """A finished shard's metadata entry, written beside it by a host that is not process 0."""
    return paths.path(out) / f"{name}.json"


def _finished(out, meta: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Finished shards by index: listed in metadata, with an entry file beside them (another host
    wrote them), or complete under their final name."""
    listed = {s["name"]: s for s in meta["shards"]}
    done = {}
    for i in range(meta["num_shards"]):
        name = latents.shard_name(i, meta["num_shards"])
        path = paths.path(out) / name
        if not path.is_file():
            continue
        want = min(meta["shard_size"], meta["num_examples"] - i * meta["shard_size"])
        if name in listed:
            done[i] = listed[name]
        elif _entry_file(out, name).is_file():
            done[i] = json.loads(_entry_file(out, name).read_text())
        elif latents.count_records(path) == want:  # renamed, but the crash came before the metadata update
            done[i] = {"name": name, "num_examples": want, "sha256": latents.file_sha256(path)}
    return done


def _record(out, meta, done, entry) -> None:
    """After a shard: one host rewrites metadata.json; several each leave the entry beside it."""
    if jax.process_count() == 1:
        meta["shards"] = [done[j] for j in sorted(done)]
        latents.write_metadata(out, meta)
    else:
        paths.atomic_write(_entry_file(out, entry["name"]), json.dumps(entry).encode())


def _merge_hosts(out, meta) -> dict[str, Any]:
    """Every host's finished shards into metadata.json (written by process 0), entry files removed."""
    sharding.sync("latents_written")
    if sharding.is_chief():
        done = _finished(out, meta)
        meta["shards"] = [done[j] for j in sorted(done)]
        latents.write_metadata(out, meta)
        for s in meta["shards"]:
            if _entry_file(out, s["name"]).exists():
                _entry_file(out, s["name"]).unlink()
    sharding.sync("latents_listed")
    return latents.read_metadata(out)


def extract(source, out: str, vae, vae_name: str = "", options: Options = Options(),
            on_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Encode `source` into `out` (resuming a previous run) on this host's devices; with several
    processes each takes every process_count-th shard. Returns the metadata."""
    devices = jax.local_devices()
    options.check(len(devices))
    if isinstance(vae, flux2_vae.Flux2AutoencoderKL) and options.mode != "mean":
        raise ValueError(f"--mode={options.mode!r} with --vae=flux2: the FLUX.2 latents are the normalised "
                         "posterior mean; use --mode=mean")
    host, hosts = jax.process_index(), jax.process_count()
    paths.path(out).mkdir(parents=True, exist_ok=True)
    meta = _plan(source, vae, vae_name, options)
    if (paths.path(out) / latents.METADATA).is_file():
        old = latents.read_metadata(out)
        for k in _SETTINGS:
            if old.get(k, _ABSENT.get(k)) != meta[k]:
                raise ValueError(f"--out={str(out)!r} holds latents with {k}={old.get(k)!r}, this run has "
                                 f"{meta[k]!r}; use the same settings to resume, or a fresh --out")
        if old["vae"]["config"] != meta["vae"]["config"]:
            raise ValueError(f"--out={str(out)!r} holds latents of another VAE config; use a fresh --out")
        meta["shards"] = old["shards"]
    mine = {latents.shard_name(i, meta["num_shards"]) + ".tmp" for i in range(host, meta["num_shards"], hosts)}
    for p in paths.path(out).iterdir():
        if p.name in mine:
            p.unlink()  # half-written by an interrupted run
    done = _finished(out, meta)
    meta["shards"] = [done[i] for i in sorted(done)]
    if sharding.is_chief():
        latents.write_metadata(out, meta)

    mesh = sharding.flat_mesh(devices)
    data, repl = sharding.batch_sharding(mesh), NamedSharding(mesh, P())
    graphdef, state = nnx.split(vae)
    state = jax.device_put(state, repl)
    key = jax.random.key(options.seed)
    encode = _jitted()
    n, k, bs = meta["num_examples"], meta["shard_size"], options.batch_size
    todo = [i for i in range(host, meta["num_shards"], hosts) if i not in done][: options.max_shards]
    bar = tqdm(total=n, initial=sum(s["num_examples"] for s in done.values()), unit="img",
               disable=not options.progress or not sharding.is_chief(), desc="latents")
    with concurrent.futures.ThreadPoolExecutor(options.workers or os.cpu_count() or 1) as pool:
        for i in todo:
            writer = latents.ShardWriter(out, latents.shard_name(i, meta["num_shards"]))
            try:
                for imgs, labels, index in _batches(source, i * k, min((i + 1) * k, n), bs, options.image_size,
                                                    pool):
                    m = len(index)  # pad the last batch: one static shape, one compilation
                    imgs = np.concatenate([imgs, np.zeros((bs - m, *imgs.shape[1:]), imgs.dtype)])
                    idx = np.concatenate([index, np.zeros(bs - m, index.dtype)]).astype(np.int32)
                    z = encode(graphdef, state, jax.device_put(imgs, data), jax.device_put(idx, data), key,
                               mode=options.mode, flips=options.flips)
                    z = np.asarray(z)[:m].astype(options.dtype)
                    for j in range(m):
                        writer.write(z[j], labels[j], index[j], imgs[j] if options.pixels else None)
                    bar.update(m * hosts)
                done[i] = writer.commit()
            except BaseException:
                writer.abort()
                raise
            _record(out, meta, done, done[i])
            if on_shard is not None:
                on_shard(i)
    bar.close()
    return _merge_hosts(out, meta) if hosts > 1 else meta


# ----------------------------------------------------------------------------- CLI
FLAGS = flags.FlagValues()
_D = Options()
flags.DEFINE_string("images", None, "Image folder with one subfolder per class.", flag_values=FLAGS)
flags.DEFINE_string("tfds", None, "tfds dataset name, e.g. imagenet2012.", flag_values=FLAGS)
flags.DEFINE_string("split", "train", "tfds split.", flag_values=FLAGS)
flags.DEFINE_string("tfds_data_dir", None, "tfds data_dir.", flag_values=FLAGS)
flags.DEFINE_string("tfds_manual_dir", None, "Folder with ImageNet's downloaded tars.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Output latent directory (resumed if it exists).", flag_values=FLAGS)
flags.DEFINE_string("vae_path", None, "diffusion_pytorch_model.safetensors or its folder (default: env "
                    "PF_VAE_WEIGHTS, else the Hugging Face hub).", flag_values=FLAGS)
flags.DEFINE_string("vae_repo", vae_lib.DEFAULT_REPO, "Hugging Face repo of the VAE.", flag_values=FLAGS)
flags.DEFINE_enum("vae", "sd", ["sd", "flux2"], "SD's KL-VAE, or FLUX.2's (needs --vae_path, a local folder).",
                  flag_values=FLAGS)
flags.DEFINE_integer("image_size", _D.image_size, "Centre-crop size.", flag_values=FLAGS)
flags.DEFINE_integer("shard_size", _D.shard_size, "Examples per shard.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", _D.batch_size, "Images per step (x2 with flips).", flag_values=FLAGS)
flags.DEFINE_enum("mode", _D.mode, list(latents.MODES), "Posterior mean, a sample, or both moments.",
                  flag_values=FLAGS)
flags.DEFINE_enum("dtype", _D.dtype, list(latents.DTYPES), "Stored dtype.", flag_values=FLAGS)
flags.DEFINE_bool("flips", _D.flips, "Also encode the horizontal mirror (--noflips: only the image).",
                  flag_values=FLAGS)
flags.DEFINE_bool("pixels", _D.pixels, "Also store each cropped uint8 image beside its latents (REPA's "
                  "on-the-fly encoder reads them; +3 x image_size^2 bytes per record).", flag_values=FLAGS)
flags.DEFINE_integer("seed", _D.seed, "Posterior sampling seed (--mode=sample).", flag_values=FLAGS)
flags.DEFINE_integer("workers", _D.workers, "Image decoding threads (0: all cores).", flag_values=FLAGS)
flags.DEFINE_integer("max_shards", None, "Write at most this many shards, then stop.", flag_values=FLAGS)
flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=FLAGS)
cluster.define_flags(FLAGS)  # --multihost & co., as in patch_forcing.main
flags.mark_flag_as_required("out", flag_values=FLAGS)
flags.mark_flags_as_mutual_exclusive(["images", "tfds"], required=True, flag_values=FLAGS)


def main(argv) -> dict[str, Any]:
    cli.parse(FLAGS, argv, __doc__)
    f = FLAGS
    cluster.initialize_from_flags(f)
    source = ImageFolder(f.images) if f.images else TfdsImages(f.tfds, f.split, f.tfds_data_dir,
                                                               f.tfds_manual_dir)
    if f.vae == "flux2":
        if not f.vae_path:
            raise ValueError(f"--vae=flux2 needs --vae_path (a local folder); {flux2_vae._GET_WEIGHTS}")
        vae = flux2_vae.load_flux2_vae(f.vae_path)
    else:
        vae = vae_lib.load_vae(f.vae_repo, local_path=f.vae_path)
    opt = Options(image_size=f.image_size, shard_size=f.shard_size, batch_size=f.batch_size, mode=f.mode,
                  dtype=f.dtype, flips=f.flips, pixels=f.pixels, seed=f.seed, workers=f.workers,
                  max_shards=f.max_shards, progress=f.progress)
    name = f.vae_path or os.environ.get(vae_lib.ENV_WEIGHTS) or f.vae_repo
    meta = extract(source, f.out, vae, name, opt)
    if sharding.is_chief():
        print(f"{len(meta['shards'])}/{meta['num_shards']} shards in {f.out}", file=sys.stderr)
    return meta


if __name__ == "__main__":
    _flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in _flags:  # byte-identical reruns on GPU too (read at backend start)
        os.environ["XLA_FLAGS"] = (_flags + " --xla_gpu_deterministic_ops=true").strip()
    cli.run(main)
