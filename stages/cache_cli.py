"""``kd-pipeline cache info|verify|pack|copy|ls``: the commands that inspect and share caches."""

from __future__ import annotations

import json
import sys

import click

from pipeline.cache.config import CacheToolConfig
from pipeline.redact import redact_record
from pipeline.step_options import Display
from stages.boundary import KDGroup
from stages.params import Only, configured
from stages.show import format_cache_info


@click.group("cache", cls=KDGroup)
def cache_group() -> None:
    """Inspect, verify, bundle, copy and list logit caches.

    CACHE is a directory, a single-file bundle NAME.zarr.zip, or s3://bucket/prefix/NAME.zarr
    (credentials and endpoint from the AWS_* environment variables, --storage-option KEY=VALUE for
    the rest).
    """


@cache_group.command("info")
@configured(Only(CacheToolConfig, "cache", "storage_options"), Only(Display, "json"))
def cache_info(cfg: CacheToolConfig, display: Display) -> None:
    """Describe CACHE: rows, classes, members, dtype, codecs, shards done, size, dataset,
    completeness."""
    from pipeline.cache.read import LogitCache

    # Redacted as every record is: a header written before redaction may hold credentials.
    info = redact_record(LogitCache(cfg.location(), allow_partial=True).info().to_dict())
    click.echo(json.dumps(info, indent=2) if display.json else format_cache_info(info))


@cache_group.command("verify")
@configured(
    Only(
        CacheToolConfig,
        "cache",
        "dataset",
        "replay",
        "teachers",
        "storage_options",
        "data_dir",
        "trust_code",
    ),
    Only(Display, "quiet"),
)
def cache_verify(cfg: CacheToolConfig, display: Display) -> None:
    """Read every chunk of CACHE (checksums) and check it against the format: exit 1 naming each
    problem. With --replay N --teacher PATH, also re-run the teacher on N stored views rebuilt
    from their parameters."""
    from pipeline.cache.verify import verify_cache

    cfg.validate()
    report = verify_cache(
        cfg.location(), dataset=cfg.dataset, data_dir=cfg.data_dir, progress=not display.quiet
    )
    if cfg.replay and report.ok:
        from pipeline.cache.replay import replay_views

        rep = replay_views(
            cfg.location(), cfg.teachers, cfg.replay, cfg.dataset, cfg.data_dir, cfg.trust_code
        )
        report.problems += rep.problems
        report.notes += rep.notes
        report.notes.append(
            f"replay: {rep.checked} stored rows of member(s) {rep.members} re-run from their "
            f"stored view parameters; largest difference {rep.worst:.2f} x its tolerance"
        )
    click.echo(report.format())
    if not report.ok:
        sys.exit(1)


@cache_group.command("pack")
@configured(Only(CacheToolConfig, "cache", "out", "storage_options"), Only(Display, "quiet"))
def cache_pack(cfg: CacheToolConfig, display: Display) -> None:
    """Bundle CACHE into the single file OUT (NAME.zarr.zip), written once, then verified."""
    from pipeline.cache.copying import pack_cache

    res = pack_cache(cfg.location(), cfg.out, progress=not display.quiet, log=click.echo)
    click.echo(res.message)


@cache_group.command("copy")
@configured(Only(CacheToolConfig, "cache", "out", "storage_options"), Only(Display, "quiet"))
def cache_copy(cfg: CacheToolConfig, display: Display) -> None:
    """Copy CACHE to OUT (directory, NAME.zarr.zip or s3://), verify the copy; a re-run resumes an
    interrupted one."""
    from pipeline.cache.copying import copy_cache

    res = copy_cache(
        cfg.location(), cfg.location("out"), progress=not display.quiet, log=click.echo
    )
    click.echo(res.message)


@cache_group.command("ls")
@configured(Only(CacheToolConfig, "prefix", "storage_options"))
def cache_ls(cfg: CacheToolConfig) -> None:
    """List the caches under PREFIX (a directory or s3://bucket/prefix), one summary line each."""
    from pipeline.cache.listing import list_caches

    found = list_caches(cfg.location("prefix"))
    for s in found:
        click.echo(s.line())
    bad = sum(s.unreadable for s in found)
    click.echo(f"{len(found)} cache(s) under {cfg.prefix}" + (f", {bad} unreadable" if bad else ""))
