"""The run report room: `ldm report RUN_DIR` and RUN_DIR/report.html (launch/report/html.py)."""
