"""What every image reader of the project shares: the exceptions that mean "this file is not a readable image".

PIL raises ``OSError`` (truncated or unidentified files), ``SyntaxError`` (broken PNG chunks), ``ValueError``,
``EOFError`` or ``Image.DecompressionBombError`` (far too many pixels) while opening, verifying or decoding a file;
the dataset check (``data_loader.verification``), the datasets and the verification protocols
(``utils.evaluation``) catch exactly these, so a corrupt file is reported with its name rather than a traceback.
"""

from __future__ import annotations

from PIL import Image

DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
