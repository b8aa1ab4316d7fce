"""msif_index.hugepages: packed copies keep every value; huge pages are used where the kernel offers them."""
from __future__ import annotations

import pytest
import torch

from msif_index import hugepages
from msif_index.hugepages import huge_page_bytes, huge_page_size, packed_on_huge_pages, use_huge_pages


def test_packed_copies_are_equal_aligned_and_independent():
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(3, 5, generator=g), torch.randn(0), torch.randn(700, 900, generator=g, dtype=torch.float64),
           torch.arange(7), torch.randn(1, generator=g)]
    out = packed_on_huge_pages(src)
    for a, b in zip(src, out):
        assert b.dtype == a.dtype and b.shape == a.shape and b.is_contiguous()
        assert torch.equal(a, b)
        assert b.data_ptr() % 64 == 0
    assert out[0].data_ptr() % huge_page_size() == 0                      # the buffer starts on a huge page
    ends = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in out if t.numel())
    assert all(e0 <= s1 for (_, e0), (s1, _) in zip(ends, ends[1:]))      # no two copies overlap
    out[0].zero_()
    assert src[0].abs().sum() > 0                                         # copies, not views of the sources


def test_small_or_odd_buffers_are_skipped():
    assert use_huge_pages([torch.zeros(10)]) == 0                         # smaller than a huge page
    assert use_huge_pages([torch.zeros(64, 64).t()]) == 0                 # not contiguous: skipped
    with pytest.raises(TypeError):
        use_huge_pages([object()])


@pytest.mark.skipif(not hugepages.available(), reason="this kernel offers no transparent huge pages")
def test_large_buffer_is_collapsed_when_the_kernel_allows():
    buf = torch.ones(16 << 20, dtype=torch.uint8)      # 16 MiB, touched (numpy would ask for huge pages itself)
    done = use_huge_pages([buf])
    if done == 0:
        pytest.skip("MADV_COLLAPSE refused here (kernel before 6.1, or no free huge pages)")
    size = huge_page_size()
    assert done % size == 0 and (16 << 20) - 2 * size <= done <= 16 << 20
    assert huge_page_bytes() >= done                                     # the process holds huge pages
    assert int(buf.sum()) == 16 << 20                                    # contents unchanged
