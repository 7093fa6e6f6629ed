"""Released checkpoints of other code bases, mapped key by key onto this project's layout and back (``vicha``)."""
