"""Synthetic FHIR bulk exports with planted treatment effects (``qis-fhir synth``).

``generate_export(out_dir, patients=..., seed=...)`` writes ``<Type>.000.ndjson`` files as a FHIR
server's ``$export`` does, and the answer key (``planted_effects``) beside the folder. See docs/synth.md.
"""

from qis_fhir.synth.generator import SynthResult, default_truth_path, generate_export

__all__ = ["SynthResult", "default_truth_path", "generate_export"]
