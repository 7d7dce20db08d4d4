"""system › hardware accelerator: an analytical roofline model of LLM inference on a catalogue of hardware.

No code here builds an accelerator; :mod:`.roofline` predicts what one would do (LLM-Viewer style,
Yuan et al., *LLM Inference Unveiled: Survey and Roofline Model Insights*, arXiv:2402.16363), and
:mod:`.probe` measures this CPU's own figures so the model can be checked against measured decoding.
It registers no technique: it transforms no model.
"""
