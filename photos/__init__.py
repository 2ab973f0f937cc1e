"""Photos in, identities out: face detection with five landmarks, ArcFace alignment, embedding of raw photos with a
trained checkpoint, two-photo comparison and open-world discovery (docs/photos.md)."""
