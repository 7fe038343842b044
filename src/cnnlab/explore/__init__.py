"""`cnnlab explore`: a local web page that shows a trained network at work (app.py: routes; static/: the page)."""
