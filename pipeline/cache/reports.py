"""What ``cache verify`` and ``cache copy`` report."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.cache.header import CacheHeader


@dataclass
class VerifyReport:
    """What ``cache verify`` found: ``problems`` empty means the cache is sound."""

    location: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    chunks_read: int = 0
    bytes_read: int = 0
    seconds: float = 0.0
    header: CacheHeader | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self) -> str:
        h = self.header
        lines = [f"cache      {self.location}"]
        if h is not None:
            lines.append(
                f"header     {h.format} v{h.version}: {h.n} rows x {h.num_classes} "
                f"classes x {len(h.members)} member(s), {h.n_shards} shards, {h.dtype}, "
                f"{'complete' if h.complete else 'PARTIAL'}"
            )
        lines.append(
            f"read       {self.chunks_read} chunks, {self.bytes_read / 2**20:.2f} MiB in "
            f"{self.seconds:.2f}s"
        )
        lines += [f"note       {n}" for n in self.notes]
        if self.ok:
            lines.append(
                "result     OK: every chunk read and checksummed, metadata matches the "
                "format schema"
            )
        else:
            lines.append(f"result     {len(self.problems)} PROBLEM(S):")
            lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass
class CopyResult:
    src: str
    dst: str
    copied: int
    skipped: int
    bytes_copied: int
    seconds: float
    report: VerifyReport

    @property
    def message(self) -> str:
        return (
            f"copied {self.src} -> {self.dst}: {self.copied} objects "
            f"({self.bytes_copied / 2**20:.2f} MiB) written, {self.skipped} already there, in "
            f"{self.seconds:.1f}s; verified: {self.report.chunks_read} chunks OK"
        )
