"""A daemon under a simulated city platform (EBD over HTTP), for the platform and e2e tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ebcd.config import Config, EbdConfig
from ebcd.protocols.ebd.signature import public_pem
from simulators.city_platform import BENCH_CITY_CODE, CityPlatform, bench_city_signer, ebcd_keys
from tests.conftest import free_port


def with_ebd(config: Config, tmp_path: Path, city_url: str, **ebd: Any) -> Config:
    """The config with [ebd] listening on a free port, reporting to `city_url`, trusting the bench city."""
    pem = tmp_path / "city.pem"
    if not pem.exists():
        pem.write_bytes(public_pem(bench_city_signer().key.public_key()))
    values: dict[str, Any] = {
        "listen": f"127.0.0.1:{free_port()}",
        "upstream_url": city_url,
        "upstream_code": BENCH_CITY_CODE,
        "verify_with": [str(pem)],
        "heartbeat_s": 2.0,
        "report_interval_s": 0.2,
        "terminal_state_interval_s": 1.0,
        "retry_initial_s": 0.2,
        "retry_max_s": 1.0,
        **ebd,
    }
    return config.model_copy(update={"ebd": EbdConfig(**values)})


@contextlib.asynccontextmanager
async def city_platform(config: Config, district_code: str) -> AsyncIterator[CityPlatform]:
    """A simulated city listening on a free port; `to_url` is set once the daemon's config is known."""
    city = CityPlatform(
        code=BENCH_CITY_CODE,
        signer=bench_city_signer(),
        district_code=district_code,
        ebcd_keys=ebcd_keys(config),
        to_url="",
    )
    await city.start()
    try:
        yield city
    finally:
        await city.down()


def ebd_url(config: Config) -> str:
    """Where the daemon of `config` takes packages from above."""
    assert config.ebd.listen is not None
    return f"http://{config.ebd.listen}/ebd/receive"
