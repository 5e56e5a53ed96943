"""Pure tensor functions: scans, SSD, causal conv. Each fast path sits beside its readable reference."""

from leanseq.ops.conv import causal_conv1d, causal_conv1d_step
from leanseq.ops.export_mode import exporting, is_exporting
from leanseq.ops.selective_scan import selective_scan_chunked, selective_scan_reference, selective_scan_step
from leanseq.ops.ssd import ssd_chunked, ssd_reference, ssd_step

__all__ = [
    "causal_conv1d",
    "causal_conv1d_step",
    "exporting",
    "is_exporting",
    "selective_scan_chunked",
    "selective_scan_reference",
    "selective_scan_step",
    "ssd_chunked",
    "ssd_reference",
    "ssd_step",
]
