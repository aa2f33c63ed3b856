"""The CUDA hint names installs that work: compressq is on no package index, so not `pip install 'compressq[gpu]'`."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from compressq.errors import CompressqError
from compressq.runtime import provider_chain


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_hint_swaps_the_wheel_and_installs_the_extra_only_from_a_clone():
    with pytest.raises(CompressqError) as error:
        provider_chain("cuda")
    hint = error.value.hint
    assert "pip uninstall -y onnxruntime && pip install onnxruntime-gpu" in hint
    assert "pip install -e '.[gpu]'" in hint and "install 'compressq[gpu]'" not in hint
