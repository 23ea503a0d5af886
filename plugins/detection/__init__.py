"""The detector plugin and its model back ends (ultralytics YOLO, darknet through OpenCV)."""
