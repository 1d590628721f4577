"""vLLM plugin entry point (`vllm.general_plugins`): registers OmniLMM with vLLM's model registry, and OmniLMM's video
loader (`omnilmm_tools.vllm_video`).

vLLM calls `register()` in every process it starts; the model module is imported only when an OmniLMM folder
is actually served.
"""


def register() -> None:
    from vllm import ModelRegistry

    from .vllm_video import register as register_video_loader

    if "OmniLMMForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("OmniLMMForCausalLM", "omnilmm_tools.vllm_model:OmniLMMForCausalLM")
    register_video_loader()
