"""The miniature model's world and its labeler.

- `voidprompt.demo.world`: seeded captioned pictures of shapes (`make_dataset`, `sample_scene`,
  `render`, `caption`), numpy + Pillow only.
- `voidprompt.demo.detector`: what a picture shows (`detect`) and how well that is known
  (`evaluate_detector`); needs scipy.

Nothing is imported here, so using the world does not pull in scipy.
"""
