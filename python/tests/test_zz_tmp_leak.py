import subprocess
def test_leak():
    subprocess.Popen(["sleep", "100"])
