"""What people run: the command line, the web page, the demo."""
