-- A small shop for kiln.apps.sql's bundled questions (sql_questions.jsonl).
CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT, joined DATE);
CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT, price REAL);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id),
                     order_date DATE, status TEXT);
CREATE TABLE order_items (order_id INTEGER REFERENCES orders(id),
                          product_id INTEGER REFERENCES products(id), quantity INTEGER);
CREATE TABLE departments (id INTEGER PRIMARY KEY, name TEXT, floor INTEGER);
CREATE TABLE employees (id INTEGER PRIMARY KEY, name TEXT, department_id INTEGER
                        REFERENCES departments(id), salary REAL, hired DATE);
CREATE TABLE suppliers (id INTEGER PRIMARY KEY, name TEXT, country TEXT);

INSERT INTO customers VALUES (1,'Ada','London','2023-01-15'), (2,'Grace','New York','2023-03-02'),
  (3,'Alan','London','2023-06-20'), (4,'Edsger','Amsterdam','2024-01-09'),
  (5,'Barbara','Boston','2024-02-11'), (6,'Donald','Stanford','2024-05-30');
INSERT INTO products VALUES (1,'Notebook','stationery',3.5), (2,'Pen','stationery',1.2),
  (3,'Lamp','home',24.0), (4,'Mug','home',8.0), (5,'Keyboard','electronics',49.9),
  (6,'Mouse','electronics',19.9), (7,'Monitor','electronics',189.0);
INSERT INTO orders VALUES (1,1,'2024-01-03','shipped'), (2,2,'2024-01-10','shipped'),
  (3,1,'2024-02-14','shipped'), (4,3,'2024-02-20','cancelled'), (5,4,'2024-03-01','shipped'),
  (6,5,'2024-03-15','pending'), (7,2,'2024-04-02','shipped'), (8,1,'2024-04-18','pending');
INSERT INTO order_items VALUES (1,1,3), (1,2,10), (2,5,1), (2,6,1), (3,3,2), (4,7,1),
  (5,4,4), (5,1,2), (6,7,2), (7,2,5), (7,4,1), (8,6,1);
INSERT INTO departments VALUES (1,'Sales',1), (2,'Warehouse',0), (3,'Engineering',2);
INSERT INTO employees VALUES (1,'Linus',3,95000,'2022-04-01'), (2,'Margaret',3,120000,'2021-09-15'),
  (3,'Ken',2,52000,'2023-01-10'), (4,'Dennis',1,61000,'2022-11-20'), (5,'Frances',1,67000,'2020-02-03');
INSERT INTO suppliers VALUES (1,'Paperworks','UK'), (2,'Brightlight','Germany'),
  (3,'Keytronic','Taiwan');
