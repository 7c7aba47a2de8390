"""Generation for language-model distillation: seeded sampling (:mod:`.sampling`) and teacher-generated
datasets (:mod:`.dataset`, the ``alambic generate`` command)."""
