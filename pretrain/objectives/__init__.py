"""ALBEF-family objectives (one module per loss) and their shared machinery: gathers, momentum copies, queues."""
