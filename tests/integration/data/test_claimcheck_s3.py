"""The edge claim check on a real SeaweedFS S3 gateway: real arrays by reference, retries, credentials."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import numpy as np
import pytest

from reflexarc.config import ConfigError
from reflexarc.edge.claimcheck import ClaimCheck, read_array
from reflexarc.edge.sources import Reading, SourceContext, source_class
from reflexarc.objectstore import ObjectStoreSettings
from reflexarc.process import free_port
from reflexarc.s3store import S3Store
from reflexarc.testing.poll import poll_until


async def _frames(cc: ClaimCheck, tmp: Path, spec: dict[str, object]) -> list[Reading]:
    cls = source_class("frames")
    ctx = SourceContext("bl1", "det1", None, cc, base_dir=tmp)
    src = cls(cls.config_model.model_validate({"type": "frames", **spec}), ctx)
    out: list[Reading] = []

    async def emit(r: Reading) -> None:
        out.append(r)

    await asyncio.wait_for(src.run(emit), 60)
    return out


async def test_frames_go_to_s3_as_arrays_with_dtype_shape_and_checksum(s3_env: S3Store, tmp_path: Path) -> None:
    # 4 MiB frames in one put; the 12 MiB one crosses the 5 MiB part size: a multipart upload.
    cc = ClaimCheck(f"{s3_env.url}/claims", 64 * 1024, ObjectStoreSettings(multipart_chunk_bytes=5 * 1024 * 1024))
    small = await _frames(
        cc,
        tmp_path,
        {"stream": "det", "shape": [1024, 1024], "dtype": "uint32", "rate_hz": 1000, "count": 3, "seed": 7},
    )
    big = await _frames(
        cc,
        tmp_path,
        {"stream": "big", "shape": [3, 1024, 1024], "dtype": "float32", "rate_hz": 1000, "count": 1, "seed": 8},
    )
    for reading in small + big:
        data = reading.data
        assert isinstance(data, dict)
        ref = data["ref"]
        assert ref["url"].startswith(f"{s3_env.url}/claims/") and ref["url"].endswith(".npy")
        assert ref["content_type"] == "application/x-npy" and ref["shape"] == data["shape"]
        assert ref["dtype"] == data["dtype"] and ref["size"] > data["size"]
        array = read_array(ref)  # downloads and checks ref["sha256"]
        assert array.dtype == np.dtype(data["dtype"]) and list(array.shape) == data["shape"]
        assert hashlib.sha256(array.tobytes()).hexdigest() == data["sha256"]
    assert big[0].data["ref"]["size"] > 12 * 1024 * 1024  # type: ignore[index]


async def test_an_unreachable_store_backs_off_and_the_frame_is_stored_later(s3_env: S3Store) -> None:
    dead = ObjectStoreSettings(endpoint_url=f"http://127.0.0.1:{free_port()}")
    cc = ClaimCheck(f"{s3_env.url}/claims", 0, dead)
    upload = asyncio.create_task(cc.put_ref("late/one.bin", b"x" * 1000))
    assert await asyncio.to_thread(poll_until, lambda: cc.retries >= 1, 60)
    assert not upload.done()  # nothing is emitted while the upload cannot complete
    cc.store = ObjectStoreSettings()  # the store comes back (here: the live endpoint)
    ref = await asyncio.wait_for(upload, 60)
    assert ref["size"] == 1000 and ref["url"] == f"{s3_env.url}/claims/late/one.bin"


def test_a_missing_credential_is_named_at_start(s3_store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RX_DET_S3_KEY", raising=False)
    settings = ObjectStoreSettings(
        endpoint_url=s3_store.endpoint_url, access_key_env="RX_DET_S3_KEY", secret_key_env="RX_DET_S3_SECRET"
    )
    with pytest.raises(ConfigError, match=r"\$RX_DET_S3_KEY, which is not set"):
        ClaimCheck(f"{s3_store.url}/claims", 1024, settings)
