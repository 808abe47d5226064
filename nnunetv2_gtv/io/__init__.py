"""The ground floor for files: every file and folder this package writes goes through here.

- :mod:`~nnunetv2_gtv.io.atomic`: files written under a temporary name beside the target and renamed into place
  (one naming scheme, one cleaner for what a killed process left), images through nnU-Net's reader/writer,
  datasets staged in a hidden folder;
- :mod:`~nnunetv2_gtv.io.folders`: output-folder checks (never inside or around an input, writable);
- :mod:`~nnunetv2_gtv.io.file_modes`: ordinary permissions for entries made by ``tempfile``.
"""
