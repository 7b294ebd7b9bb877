from tgis_cli.main import app

app()
