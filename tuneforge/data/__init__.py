"""Training data: reading files (readers), row formats (formats), chat rendering and loss masks (render), the
files of a data-prep output (prepared) and the data report (report). The data-prep stage strings them together."""
