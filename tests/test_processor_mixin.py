"""transformers' own processor tests (`ProcessorTesterMixin`, `tests/test_processing_common.py` of the installed
transformers version) run against `OmniLMMProcessor`: its kwargs handling, saving and loading, chat templates, token
counting, replacement offsets and `mm_token_type_ids`, for images and videos.

The test file is not part of the transformers wheel: it is taken from the source distribution of the installed
version (`pip download`, cached in `~/.cache/omnilmm-hf/`). Images and videos are the mixin's own generated arrays;
the few mixin tests that read media from the Hub are left out (`NEEDS_THE_HUB`), as this machine is offline, and so
are three checks of older copies (`CORRECTED_LATER`) that the newest tested version's copy has corrected and runs.
"""

import importlib.util
import subprocess
import sys
import tarfile
import types
import unittest
from pathlib import Path

import transformers
from packaging.version import Version
from transformers import AutoImageProcessor, AutoProcessor, AutoVideoProcessor

from omnilmm_tools.remote import remote_module
from omnilmm_tools.tokenizer import build_tokenizer

CACHE = Path.home() / ".cache" / "omnilmm-hf" / f"transformers-{transformers.__version__}-tests"
# Before transformers 5.24 the mixin wanted every output of `return_tensors="pt"` to be a tensor (processors now
# declare ragged outputs, `skip_tensor_conversion`: OmniLMM's views differ in size), and compared the replacement
# offsets with re-decoded ids (decoding writes a space after a special token the text does not have); 5.24 checks both
# as it should.
CORRECTED_LATER = (
    "test_apply_chat_template_decoded_video",
    "test_flat_kwarg_applied_when_modality_dict_lacks_it",
    "test_replacement_offsets",
) if Version(transformers.__version__) < Version("5.24") else ()
NEEDS_THE_HUB = (  # they read MODALITY_INPUT_DATA's URLs, or another image, from huggingface.co
    "test_apply_chat_template_image",
    "test_processor_text_has_no_visual",  # (its last step; tests/test_processor.py batches text-only samples)
    "test_apply_chat_template_video",
    "test_apply_chat_template_video_frame_sampling",
    "test_chat_template_audio_from_video",
)


def transformers_test_module():
    """`tests/test_processing_common.py` of the installed transformers, from its source distribution."""
    source = CACHE / "test_processing_common.py"
    if not source.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", f"transformers=={transformers.__version__}",
                        "--no-binary", ":all:", "--no-deps", "--no-build-isolation", "-d", str(CACHE), "-q"],
                       check=True)
        archive = next(CACHE.glob("transformers-*.tar.gz"))
        with tarfile.open(archive) as tar:
            member = tar.getmember(f"{archive.name.removesuffix('.tar.gz')}/tests/test_processing_common.py")
            source.write_bytes(tar.extractfile(member).read())
    # It imports transformers' CI helper that maps Hub URLs to a local cache; offline, a URL stays a URL.
    helper = types.ModuleType("fetch_hub_objects_for_ci")
    helper.url_to_local_path = lambda url, **kwargs: url
    sys.modules.setdefault("fetch_hub_objects_for_ci", helper)
    spec = importlib.util.spec_from_file_location("transformers_test_processing_common", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


common = transformers_test_module()
configuration = remote_module("configuration_omnilmm")
image_processing = remote_module("image_processing_omnilmm")
video_processing = remote_module("video_processing_omnilmm")
processing = remote_module("processing_omnilmm")
# The Auto classes find the remote-code classes by name, as `AutoProcessor.from_pretrained(...,
# trust_remote_code=True)` finds them in a model folder (the mixin loads components with the Auto classes, without
# that flag).
AutoImageProcessor.register(configuration.OmniLMMConfig, image_processing.OmniLMMImageProcessor, exist_ok=True)
AutoVideoProcessor.register(configuration.OmniLMMConfig, video_processing.OmniLMMVideoProcessor, exist_ok=True)
AutoProcessor.register(configuration.OmniLMMConfig, processing.OmniLMMProcessor, exist_ok=True)


class OmniLMMProcessorTest(common.ProcessorTesterMixin, unittest.TestCase):
    processor_class = processing.OmniLMMProcessor
    videos_input_name = "pixel_values"  # a video's frames are views in `pixel_values`, in span order
    # The mixin's 8-frame 30 x 400 videos are sliced (an overview and 4 tiles per frame): 258 tokens, more than its
    # default lengths; these are the lengths it expects the text to be padded to.
    videos_text_kwargs_max_length, videos_text_kwargs_override_max_length = 400, 390
    videos_unstructured_max_length = 410

    components = (processing.OmniLMMProcessor, image_processing.OmniLMMImageProcessor,
                  video_processing.OmniLMMVideoProcessor)

    @classmethod
    def setUpClass(cls):
        # As transformers' own classes are: not registered for an Auto class (the tools that write model folders
        # register them, which adds `auto_map` to what they save), whatever ran before in this process.
        cls.registered = [component._auto_class for component in cls.components]
        for component in cls.components:
            component._auto_class = None
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        super().tearDownClass()
        for component, registered in zip(cls.components, cls.registered):
            component._auto_class = registered

    @classmethod
    def _setup_tokenizer(cls):
        return build_tokenizer()

    @classmethod
    def _setup_image_processor(cls):
        return image_processing.OmniLMMImageProcessor(slice_mode=True, scale_resolution=56, image_size=56)

    @classmethod
    def _setup_video_processor(cls):
        return video_processing.OmniLMMVideoProcessor(slice_mode=True, scale_resolution=56, image_size=56)

    @staticmethod
    def prepare_processor_dict():
        return {"num_query": 4}


for name in dir(OmniLMMProcessorTest):  # (and their parameterized variants `..._0`, `..._1`)
    if name.startswith(NEEDS_THE_HUB + CORRECTED_LATER):
        setattr(OmniLMMProcessorTest, name, None)  # not collected: see the module docstring
