# The MLflow tracking server of infra/k8s/mlflow.yaml: upstream MLflow at the version the clients use
# (mlflow== in constraints.txt) plus what upstream leaves out: the PostgreSQL driver and boto3 for S3 artifacts.
#
#   docker build -f infra/k8s/mlflow.Dockerfile -t ghcr.io/REPLACE_ME-org/revcol-mlflow:3.17.2 infra/k8s
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir psycopg2-binary==2.9.13 boto3==1.44.8
