-- One database per service.
CREATE DATABASE shopverse_users;
CREATE DATABASE shopverse_products;
CREATE DATABASE shopverse_orders;
CREATE DATABASE shopverse_payments;
CREATE DATABASE shopverse_notifications;
CREATE DATABASE shopverse_delivery;
